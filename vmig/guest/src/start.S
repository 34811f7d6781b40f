/*
 * vmig guest entry: 16-bit real mode -> long mode, then guest_main(cpu) in C.
 *
 * The VMM starts vCPU i in real mode with CS=0, IP=ENTRY_BASE + i*ENTRY_STRIDE
 * and sets no other register. KVM here is PVM, which cannot start a vCPU in
 * long mode directly, so every vCPU switches itself: lgdt, CR4.PAE, CR3 = the
 * VMM's PML4, EFER.LME, CR0.PG|PE, far jump to a 64-bit code segment.
 *
 * All vCPUs run this code at the same time: it writes no memory (the GDT
 * descriptors have their accessed bits preset so the CPU never writes them
 * back) and keeps the cpu index in %esi until C gets it as its argument.
 */
#include "layout.h"

#define GDT_CODE64 0x08
#define GDT_DATA 0x10

#define CR0_PE 0x00000001
#define CR0_NW 0x20000000
#define CR0_CD 0x40000000
#define CR0_PG 0x80000000
#define CR4_PAE 0x00000020
#define MSR_EFER 0xC0000080
#define EFER_LME 0x00000100

    .section .text.entry, "ax", @progbits
    .code16
    .globl entry_stubs
entry_stubs:
    /* MAX_CPUS stubs of exactly ENTRY_STRIDE bytes: cpu index -> %esi. */
    .set cpu, 0
    .rept MAX_CPUS
    .org cpu * ENTRY_STRIDE, 0xf4
    movl $cpu, %esi
    jmp common16
    .set cpu, cpu + 1
    .endr
    .org MAX_CPUS * ENTRY_STRIDE, 0xf4

common16:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl gdt_desc
    movl $CR4_PAE, %eax
    movl %eax, %cr4
    movl $PML4_GPA, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    andl $~(CR0_CD | CR0_NW), %eax      /* reset value has caches disabled */
    orl $(CR0_PG | CR0_PE), %eax
    movl %eax, %cr0
    ljmpl $GDT_CODE64, $long64

    .code64
long64:
    movw $GDT_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movl %esi, %edi                     /* cpu index, zero-extended: guest_main's argument */
    movl %edi, %eax
    imull $STACK_SIZE, %eax
    movl $STACK_TOP, %esp
    subq %rax, %rsp                     /* 16-byte aligned; the call pushes the return */
    xorl %ebp, %ebp
    call guest_main
1:  hlt                                 /* guest_main does not return */
    jmp 1b

    .balign 8
gdt:
    .quad 0                             /* null */
    .quad 0x00af9b000000ffff            /* 0x08: 64-bit code, present, accessed */
    .quad 0x00cf93000000ffff            /* 0x10: data, writable, accessed */
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt

    .section .note.GNU-stack, "", @progbits

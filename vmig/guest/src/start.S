/*
 * vmig guest entry: 16-bit real mode (vmig) or 32-bit Multiboot (QEMU) -> long mode,
 * then guest_main(cpu) in C.
 *
 * vmig starts vCPU i in real mode with CS=0, IP=ENTRY_BASE + i*ENTRY_STRIDE
 * and sets no other register. KVM here is PVM, which cannot start a vCPU in
 * long mode directly, so every vCPU switches itself: lgdt, CR4.PAE, CR3 = the
 * VMM's PML4, EFER.LME, CR0.PG|PE, far jump to a 64-bit code segment.
 * All vCPUs run that code at the same time: it writes no memory (the GDT
 * descriptors have their accessed bits preset so the CPU never writes them
 * back) and keeps the cpu index in %esi until C gets it as its argument.
 *
 * A Multiboot loader (QEMU's -kernel) enters multiboot_entry on one vCPU in
 * 32-bit protected mode, paging off, EAX = MULTIBOOT_BOOT_MAGIC, EBX = the
 * Multiboot information. No VMM prepared anything, so it clears the config and
 * status pages, copies the command line into the config page (where vmig writes
 * it), builds an identity map of the first MULTIBOOT_MAP_GIBS GiB itself and then
 * makes the same switch to long mode as cpu 0.
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
#define PTE_PRESENT_WRITABLE 0x3
#define PDE_LARGE 0x83 /* present | writable | 2 MiB page */
#define PAGE 4096

/* lgdt, CR4.PAE, CR3 = PML4_GPA, EFER.LME, CR0.PG|PE, far jump to long64: assembled
 * once for 16-bit real mode and once for 32-bit protected mode. */
.macro enter_long_mode
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
.endm

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

    /* Multiboot v1 header (in the first 8 KiB, 4-byte aligned); the address fields
     * load the whole flat image at ENTRY_BASE, .bss included (it is in the image). */
    .balign 4
multiboot_header:
    .long MULTIBOOT_HEADER_MAGIC
    .long MULTIBOOT_HEADER_FLAGS
    .long (-(MULTIBOOT_HEADER_MAGIC + MULTIBOOT_HEADER_FLAGS)) & 0xffffffff  /* checksum */
    .long multiboot_header              /* header_addr */
    .long ENTRY_BASE                    /* load_addr: the image's first byte */
    .long _image_end                    /* load_end_addr */
    .long _image_end                    /* bss_end_addr */
    .long multiboot_entry               /* entry_addr */

common16:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    enter_long_mode

    .code32
multiboot_entry:
    cli
    cld
    cmpl $MULTIBOOT_BOOT_MAGIC, %eax
    jne 9f
    movl %ebx, %edx                     /* Multiboot information */
    /* Config and status pages: zero (the firmware ran here). */
    xorl %eax, %eax
    movl $CONFIG_GPA, %edi
    movl $(PAGE / 4), %ecx
    rep stosl
    movl $STATUS_GPA, %edi
    movl $(PAGE / 4), %ecx
    rep stosl
    /* Copy the command line first: it sits right after the image, where the page
     * directories may go. At most CMDLINE_SIZE - 1 bytes; the page is zero beyond. */
    testl $MULTIBOOT_INFO_CMDLINE, MBI_FLAGS(%edx)
    jz 2f
    movl MBI_CMDLINE(%edx), %esi
    movl $(CONFIG_GPA + CFG_CMDLINE), %edi
    movl $(CMDLINE_SIZE - 1), %ecx
1:  lodsb
    testb %al, %al
    jz 2f
    stosb
    loop 1b
2:  movl %edx, CONFIG_GPA + CFG_MULTIBOOT_INFO
    movl $(CONFIG_MAGIC & 0xffffffff), CONFIG_GPA + CFG_MAGIC
    movl $(CONFIG_MAGIC >> 32), CONFIG_GPA + CFG_MAGIC + 4
    /* Identity map: PML4[0] -> PDPT; PDPT[i] -> PD_GPA + i pages; 2 MiB pages. */
    xorl %eax, %eax
    movl $PML4_GPA, %edi
    movl $(2 * PAGE / 4), %ecx          /* PML4 and PDPT pages */
    rep stosl
    movl $(PDPT_GPA | PTE_PRESENT_WRITABLE), PML4_GPA
    xorl %ecx, %ecx
3:  movl %ecx, %eax
    shll $12, %eax
    addl $(PD_GPA | PTE_PRESENT_WRITABLE), %eax
    movl %eax, PDPT_GPA(, %ecx, 8)
    incl %ecx
    cmpl $MULTIBOOT_MAP_GIBS, %ecx
    jb 3b
    xorl %ecx, %ecx                     /* 2 MiB page number */
4:  movl %ecx, %eax
    shll $21, %eax
    orl $PDE_LARGE, %eax
    movl %eax, PD_GPA(, %ecx, 8)
    movl %ecx, %eax
    shrl $11, %eax                      /* bits 32+ of the address: page number / 2048 */
    movl %eax, PD_GPA + 4(, %ecx, 8)
    incl %ecx
    cmpl $(MULTIBOOT_MAP_GIBS * 512), %ecx
    jb 4b
    xorl %esi, %esi                     /* cpu 0 */
    enter_long_mode
9:  hlt                                 /* not a Multiboot boot: stop */
    jmp 9b

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

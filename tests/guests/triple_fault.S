/* A boot sector that triple-faults: it says so on COM1, switches itself to 64-bit long
 * mode (identity map of the first 2 MiB: PML4 0x1000, PDPT 0x2000, PD 0x3000), loads
 * an empty IDT and executes ud2; with no IDT entry the CPU escalates to a double and
 * then a triple fault, which KVM reports as a shutdown. On this KVM (PVM) an exception
 * in the emulated real and 32-bit modes, and int3 / int $n even in long mode, end in
 * a KVM internal error (emulation failure) instead. tests/asm.py build_raw. */
    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov $msg, %si
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  movl $0x2003, 0x1000       /* PML4[0] -> PDPT, present | writable */
    movl $0x3003, 0x2000       /* PDPT[0] -> PD */
    movl $0x0083, 0x3000       /* PD[0]: 2 MiB page at 0, present | writable | large */
    lgdtl gdtr
    mov $0x20, %eax            /* CR4.PAE */
    mov %eax, %cr4
    mov $0x1000, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx      /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    and $~0x60000000, %eax     /* caches on */
    or $0x80000001, %eax       /* PG | PE */
    mov %eax, %cr0
    ljmpl $0x08, $long64

    .code64
long64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $idtr, %eax            /* (a 32-bit link: no 64-bit absolute addresses) */
    lidt (%rax)                /* limit 0: every vector is out of bounds */
    ud2                        /* #UD, no handler: #DF, no handler: triple fault */
    jmp .

msg:  .asciz "about to triple-fault\n"
    .p2align 3
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF   /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF   /* 0x10: data */
gdtr: .word gdtr - gdt - 1
      .long gdt
idtr: .word 0
      .quad 0

    .org 510
    .byte 0x55, 0xaa

/* A boot sector that counts in memory, for the boot-image tests (tests/asm.py build_raw).
 *
 * Entered at 0000:7c00 in real mode with DL = the boot drive, it switches itself to
 * 32-bit protected mode, enables A20 through port 0x92, says on COM1 what it found,
 * pokes the unknown port 0x80 (3 writes, 1 read) and then sweeps SWEEP_PAGES pages
 * from REGION forever: pass g writes to every page, in order, the words
 *     [0] g    [4] g ^ CHECK ^ page index
 * so at any moment pages 0..k-1 hold pass g and pages k.. hold pass g-1 (or zero,
 * during the first pass). Any page lost or stale in a migration breaks that.
 * Between batches of BATCH pages it naps with `sti; hlt` (the VMM re-enters a halted
 * vCPU with interrupts enabled after a few milliseconds: there are no interrupts).
 * The pass number and the page being written are at STATUS / STATUS + 4.
 */
#ifndef SWEEP_PAGES
#define SWEEP_PAGES 2048
#endif
#ifndef BATCH
#define BATCH 64
#endif
#define REGION 0x200000
#define CHECK 0xA5A5A5A5
#define STATUS 0x1000
#define COM1 0x3f8

    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7c00, %sp
    mov %dl, boot_drive
    lgdt gdtr
    mov %cr0, %eax
    or $1, %al
    mov %eax, %cr0
    ljmpl $0x08, $pm32

    .code32
pm32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7c00, %esp

    inb $0x92, %al            /* fast A20 on */
    or $2, %al
    outb %al, $0x92
    inb $0x92, %al
    mov %al, a20_value

    mov $hello, %esi
    call puts
    movzbl boot_drive, %eax
    call puthex8
    mov $a20_text, %esi
    call puts
    movzbl a20_value, %eax
    call puthex8
    mov $newline, %esi
    call puts

    mov $0x55, %al            /* POST codes: an unknown port */
    outb %al, $0x80
    outb %al, $0x80
    outb %al, $0x80
    inb $0x80, %al

    mov $1, %ebx              /* ebx = pass, starting at 1 */
pass:
    mov %ebx, STATUS
    xor %ecx, %ecx            /* ecx = page index */
page:
    mov %ecx, STATUS + 4
    mov %ecx, %edi
    shl $12, %edi
    add $REGION, %edi
    mov %ebx, (%edi)
    mov %ebx, %eax
    xor $CHECK, %eax
    xor %ecx, %eax
    mov %eax, 4(%edi)
    inc %ecx
    test $(BATCH - 1), %ecx
    jnz 1f
    sti                       /* nap: the VMM wakes a halt with IF set */
    hlt
    cli
1:  cmp $SWEEP_PAGES, %ecx
    jb page
    inc %ebx
    jmp pass

/* puts: write the NUL-terminated string at esi to COM1 */
puts:
    mov $COM1, %dx
1:  lodsb
    test %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  ret

/* puthex8: write al as two hex digits */
puthex8:
    mov %eax, %ecx
    shr $4, %eax
    call hexdigit
    mov %ecx, %eax
hexdigit:
    and $0xf, %eax
    mov hexdigits(%eax), %al
    mov $COM1, %dx
    outb %al, %dx
    ret

hello:    .asciz "counter boot: dl=0x"
a20_text: .asciz " port92=0x"
newline:  .asciz "\n"
hexdigits: .ascii "0123456789abcdef"
boot_drive: .byte 0
a20_value:  .byte 0

    .p2align 3
gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF   /* 0x08: flat 32-bit code */
    .quad 0x00CF92000000FFFF   /* 0x10: flat data */
gdtr:
    .word gdtr - gdt - 1
    .long gdt

    .org 510
    .byte 0x55, 0xaa

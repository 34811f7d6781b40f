/* A boot sector that halts for good: it says so on COM1 and halts with interrupts
 * disabled, which nothing can end (there is no NMI). Were the VMM to run it on after
 * the HLT, it would print "woke" (tests/asm.py build_raw). */
    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov $halting, %si
    call puts
    hlt
    mov $woke, %si
    call puts
    jmp .

puts:
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  ret

halting: .asciz "halting for good\n"
woke:    .asciz "woke\n"

    .org 510
    .byte 0x55, 0xaa

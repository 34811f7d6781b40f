/* A Multiboot v1 kernel for the boot-image tests (tests/asm.py build_multiboot).
 *
 * Reports on COM1 what its loader handed it, one line each:
 *     multiboot: eax=0x2badb002 flags=0x...
 *     mem_lower=0x... mem_upper=0x...
 *     cmdline=<the command line>
 *     mmap base=0x... length=0x... type=0x...     (one line per entry)
 *     ready
 * then counts: pass g writes g to the first word of each of SWEEP_PAGES pages from
 * REGION and prints "tick g" after each pass, napping with `sti; hlt` (the VMM
 * re-enters a halted vCPU with interrupts enabled after a few milliseconds).
 */
#define MB_MAGIC 0x1BADB002
#ifdef ADDRESS_FIELDS             /* a flat image: the loader reads the header's addresses */
#define MB_FLAGS 0x00010003       /* ... and bit 16, the address fields */
#else
#define MB_FLAGS 0x00000003       /* page-aligned modules, memory information */
#endif
#define COM1 0x3f8
#define REGION 0x400000
#define SWEEP_PAGES 1024

    .section .multiboot, "a"
    .p2align 2
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
#ifdef ADDRESS_FIELDS
mb_header = . - 12
    .long mb_header           /* header_addr */
    .long image_start         /* load_addr: the file's first byte */
    .long 0                   /* load_end_addr: the whole file */
    .long image_end           /* bss_end_addr: zeroed up to here */
    .long _start              /* entry_addr */
#endif

    .text
    .code32
    .globl _start
_start:
    cli
    mov $stack_top, %esp
    mov %eax, %ebp            /* the loader's magic */
    mov %ebx, %edi            /* the Multiboot information */

    mov $t_magic, %esi
    call puts
    mov %ebp, %eax
    call puthex
    mov $t_flags, %esi
    call puts
    mov (%edi), %eax
    call puthex
    call newline

    mov $t_lower, %esi
    call puts
    mov 4(%edi), %eax
    call puthex
    mov $t_upper, %esi
    call puts
    mov 8(%edi), %eax
    call puthex
    call newline

    mov $t_cmdline, %esi
    call puts
    mov 16(%edi), %esi
    call puts
    call newline

    mov 48(%edi), %ebx        /* mmap_addr */
    mov 44(%edi), %ecx        /* mmap_length */
    add %ebx, %ecx
    mov %ecx, mmap_end
1:  cmp mmap_end, %ebx
    jae 2f
    mov $t_base, %esi
    call puts
    mov 4(%ebx), %eax         /* base, low 32 bits (all of it below 4 GiB) */
    call puthex
    mov $t_length, %esi
    call puts
    mov 12(%ebx), %eax
    call puthex
    mov $t_type, %esi
    call puts
    mov 20(%ebx), %eax
    call puthex
    call newline
    mov (%ebx), %eax          /* size of this entry, without the size field */
    lea 4(%ebx, %eax), %ebx
    jmp 1b
2:  mov $t_ready, %esi
    call puts

    mov $1, %ebx              /* pass */
pass:
    xor %ecx, %ecx
page:
    mov %ecx, %edi
    shl $12, %edi
    mov %ebx, REGION(%edi)
    inc %ecx
    test $63, %ecx
    jnz 1f
    sti
    hlt
    cli
1:  cmp $SWEEP_PAGES, %ecx
    jb page
    mov $t_tick, %esi
    call puts
    mov %ebx, %eax
    call puthex
    call newline
    inc %ebx
    jmp pass

puts:                         /* the NUL-terminated string at esi to COM1 */
    push %eax
    push %edx
    mov $COM1, %dx
1:  lodsb
    test %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  pop %edx
    pop %eax
    ret

newline:
    mov $t_newline, %esi
    jmp puts

puthex:                       /* eax as 0x and 8 hex digits */
    push %ecx
    push %edx
    push %eax
    mov $t_hex, %esi
    call puts
    pop %eax
    mov $8, %ecx
1:  rol $4, %eax
    push %eax
    and $0xf, %eax
    mov hexdigits(%eax), %al
    mov $COM1, %dx
    outb %al, %dx
    pop %eax
    loop 1b
    pop %edx
    pop %ecx
    ret

    .section .rodata
t_magic:   .asciz "multiboot: eax="
t_flags:   .asciz " flags="
t_lower:   .asciz "mem_lower="
t_upper:   .asciz " mem_upper="
t_cmdline: .asciz "cmdline="
t_base:    .asciz "mmap base="
t_length:  .asciz " length="
t_type:    .asciz " type="
t_ready:   .asciz "ready\n"
t_tick:    .asciz "tick "
t_newline: .asciz "\n"
t_hex:     .asciz "0x"
hexdigits: .ascii "0123456789abcdef"

    .bss
    .p2align 4
mmap_end: .long 0
    .space 4096
stack_top:

/* The state-test guest: a raw boot sector (loaded at 0x7c00, entered in real mode).
 *
 * 600 bytes: the first 512 end in 0x55 0xaa, the data tables follow them.
 * It switches to 32-bit protected mode, enables SSE (CR4.OSFXSR), loads XMM0-XMM7,
 * DR0-DR3 and DR7, writes MSRs that vmig's state format 1 did not carry, registers
 * kvmclock (MSR_KVM_SYSTEM_TIME_NEW) at KVMCLOCK, and then loops forever: re-read
 * every one of those registers and write them, the TSC and a copy of the kvmclock
 * structure into the RESULT page, then bump the loop counter. The test reads the page
 * through the guest's memory file (tests/state_guest.py knows the layout).
 */
#define KVMCLOCK  0x8000    /* pvclock_vcpu_time_info, 32 bytes */
#define WALLCLOCK 0x8040    /* pvclock_wall_clock, written once by KVM */
#define RESULT    0x9000
/* RESULT layout, 8-byte words: */
#define R_COUNTER 0x00      /* loop iterations */
#define R_TSC     0x08      /* rdtsc of this iteration */
#define R_DR      0x10      /* DR0-DR3, DR7: 5 words */
#define R_XMM     0x40      /* XMM0-XMM7: 16 bytes each */
#define R_MSR     0xc0      /* the MSRs in msr_list order, 8 bytes each */
#define R_CLOCK   0x140     /* the kvmclock structure as the guest saw it, 32 bytes */
#define R_MAGIC   0x180     /* 0x5354415445 ("STATE") once the registers are set */

.code16
.globl _start
_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %ss
    movw $0x7000, %sp
    lgdtl gdt_desc
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $protected

.code32
protected:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr0, %eax             /* SSE: CR0.EM off, CR0.MP on; CR4.OSFXSR|OSXMMEXCPT */
    andl $~4, %eax
    orl $2, %eax
    movl %eax, %cr0
    movl %cr4, %eax
    orl $0x600, %eax
    movl %eax, %cr4
    movl $xmm_values, %esi
    movdqu 0x00(%esi), %xmm0
    movdqu 0x10(%esi), %xmm1
    movdqu 0x20(%esi), %xmm2
    movdqu 0x30(%esi), %xmm3
    movdqu 0x40(%esi), %xmm4
    movdqu 0x50(%esi), %xmm5
    movdqu 0x60(%esi), %xmm6
    movdqu 0x70(%esi), %xmm7
    movl $0x11110000, %eax
    movl %eax, %dr0
    movl $0x22220000, %eax
    movl %eax, %dr1
    movl $0x33330000, %eax
    movl %eax, %dr2
    movl $0x44440000, %eax
    movl %eax, %dr3
    movl $0x000004aa, %eax      /* G0-G3 set, L0-L3 clear (bit 10 is reserved, 1) */
    movl %eax, %dr7
    movl $msr_writes, %esi      /* (index, low, high) triples, index 0 ends */
1:  movl (%esi), %ecx
    testl %ecx, %ecx
    jz 2f
    movl 4(%esi), %eax
    movl 8(%esi), %edx
    wrmsr
    addl $12, %esi
    jmp 1b
2:  movl $RESULT, %ebx
    movl $0x54415445, R_MAGIC(%ebx)
    movl $0x53, R_MAGIC+4(%ebx)

loop:
    movl %dr0, %eax
    movl %eax, R_DR+0x00(%ebx)
    movl %dr1, %eax
    movl %eax, R_DR+0x08(%ebx)
    movl %dr2, %eax
    movl %eax, R_DR+0x10(%ebx)
    movl %dr3, %eax
    movl %eax, R_DR+0x18(%ebx)
    movl %dr7, %eax
    movl %eax, R_DR+0x20(%ebx)
    movdqu %xmm0, R_XMM+0x00(%ebx)
    movdqu %xmm1, R_XMM+0x10(%ebx)
    movdqu %xmm2, R_XMM+0x20(%ebx)
    movdqu %xmm3, R_XMM+0x30(%ebx)
    movdqu %xmm4, R_XMM+0x40(%ebx)
    movdqu %xmm5, R_XMM+0x50(%ebx)
    movdqu %xmm6, R_XMM+0x60(%ebx)
    movdqu %xmm7, R_XMM+0x70(%ebx)
    movl $msr_writes, %esi
    leal R_MSR(%ebx), %edi
3:  movl (%esi), %ecx
    testl %ecx, %ecx
    jz 4f
    rdmsr
    movl %eax, (%edi)
    movl %edx, 4(%edi)
    addl $12, %esi
    addl $8, %edi
    jmp 3b
4:  movl $KVMCLOCK, %esi
    leal R_CLOCK(%ebx), %edi
    movl $8, %ecx
    rep movsl
    rdtsc
    movl %eax, R_TSC(%ebx)
    movl %edx, R_TSC+4(%ebx)
    incl R_COUNTER(%ebx)
    jmp loop

.org 510                        /* the boot signature; the data follows it */
    .byte 0x55, 0xaa

.align 16
xmm_values:                     /* XMMn: two quads that name n */
    .quad 0x11110123456789ab, 0xfedcba9876500000
    .quad 0x22220123456789ab, 0xfedcba9876511111
    .quad 0x33330123456789ab, 0xfedcba9876522222
    .quad 0x44440123456789ab, 0xfedcba9876533333
    .quad 0x55550123456789ab, 0xfedcba9876544444
    .quad 0x66660123456789ab, 0xfedcba9876555555
    .quad 0x77770123456789ab, 0xfedcba9876566666
    .quad 0x88880123456789ab, 0xfedcba9876577777
msr_writes:                     /* index, low 32 bits, high 32 bits */
    .long 0x0000003b, 0x00100000, 0           /* TSC_ADJUST (moves the TSC by 2^20) */
    .long 0x00000176, 0x00107c00, 0           /* SYSENTER_EIP */
    .long 0x000001a0, 0x00000801, 0           /* MISC_ENABLE: fast strings, BTS unavailable */
    .long 0x4b564d05, 0x00000000, 0           /* KVM_POLL_CONTROL (KVM's default is 1) */
    .long 0x4b564d00, WALLCLOCK, 0            /* KVM_WALL_CLOCK_NEW */
    .long 0x4b564d01, KVMCLOCK | 1, 0         /* KVM_SYSTEM_TIME_NEW, enabled */
    .long 0
.align 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    /* 0x08: 32-bit code, base 0, 4 GiB */
    .quad 0x00cf92000000ffff    /* 0x10: data */
gdt_desc:
    .word 23
    .long gdt


/*
 * vmig guest naps: how a vCPU with nothing to do waits a few milliseconds.
 */
#include "guest.h"

/*
 * Booted by vmig, a nap is hlt: the VMM re-enters the vCPU within a few ms.
 * Booted by Multiboot nothing would wake a hlt with interrupts off, so the guest
 * sets up an IDT and arms its local APIC's one-shot timer for each nap, then
 * sti; hlt; cli. Without tsc_khz it cannot time the APIC and spins instead.
 */
#define LAPIC ((volatile u32 *)0xFEE00000ULL)
#define LAPIC_EOI 0xB0
#define LAPIC_SVR 0xF0
#define LAPIC_SVR_ENABLE 0x100
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_CURRENT 0x390
#define LAPIC_TIMER_DIVIDE 0x3E0
#define LAPIC_DIVIDE_BY_1 0xB
#define TIMER_VECTOR 0x30
#define SPURIOUS_VECTOR 0xFF
#define IDT_ENTRIES 256
#define GATE_INTERRUPT 0x8EULL /* present, DPL 0, 64-bit interrupt gate */
#define CODE64_SELECTOR 0x08   /* start.S's GDT */
#define PIC1_DATA 0x21
#define PIC2_DATA 0xA1
#define CALIBRATE_US 1000ULL

static u64 apic_ticks_per_ms; /* 0: no timer (vmig boot, or no tsc_khz): hlt or spin */

static inline void lapic_write(u32 reg, u32 value)
{
    LAPIC[reg / 4] = value;
}

static inline u32 lapic_read(u32 reg)
{
    return LAPIC[reg / 4];
}

void interrupt_entry(void); /* start.S: EOI and iretq, for every vector */

/* Multiboot boot, cpu 0 only: IDT, PICs masked, APIC timer calibrated against the TSC. */
void timer_setup(const struct guest *g)
{
    if (!g->multiboot || !g->tsc_khz)
        return;
    volatile u64 *idt = (volatile u64 *)IDT_GPA;
    u64 handler = (u64)interrupt_entry;
    for (u64 vector = 0; vector < IDT_ENTRIES; vector++) {
        idt[2 * vector] = (handler & 0xFFFF) | ((u64)CODE64_SELECTOR << 16) |
                          (GATE_INTERRUPT << 40) | (((handler >> 16) & 0xFFFF) << 48);
        idt[2 * vector + 1] = handler >> 32;
    }
    struct __attribute__((packed)) {
        u16 limit;
        u64 base;
    } idtr = {IDT_ENTRIES * 16 - 1, IDT_GPA};
    __asm__ volatile("lidt %0" : : "m"(idtr) : "memory");
    outb(PIC1_DATA, 0xFF); /* the firmware's 8259s stay quiet */
    outb(PIC2_DATA, 0xFF);
    lapic_write(LAPIC_SVR, LAPIC_SVR_ENABLE | SPURIOUS_VECTOR);
    lapic_write(LAPIC_TIMER_DIVIDE, LAPIC_DIVIDE_BY_1);
    lapic_write(LAPIC_LVT_TIMER, TIMER_VECTOR); /* one-shot, not masked */
    lapic_write(LAPIC_TIMER_INITIAL, 0xFFFFFFFFU);
    u64 start = rdtsc();
    while (rdtsc() - start < g->tsc_khz * CALIBRATE_US / 1000)
        cpu_relax();
    u64 elapsed = 0xFFFFFFFFULL - lapic_read(LAPIC_TIMER_CURRENT);
    lapic_write(LAPIC_TIMER_INITIAL, 0);
    apic_ticks_per_ms = elapsed * 1000 / CALIBRATE_US;
}

/* Sleep about `us` microseconds (vmig: until the VMM re-enters, a few ms). */
void nap(const struct guest *g, u64 us)
{
    if (!g->multiboot) {
        halt();
        return;
    }
    if (apic_ticks_per_ms) {
        u64 count = apic_ticks_per_ms * us / 1000;
        lapic_write(LAPIC_TIMER_INITIAL, count > 0xFFFFFFFFULL ? 0xFFFFFFFFU : (u32)count);
        __asm__ volatile("sti; hlt; cli" ::: "memory");
        return;
    }
    u64 until = rdtsc() + (g->tsc_khz ? g->tsc_khz : 1000000) * us / 1000;
    while (rdtsc() < until)
        cpu_relax();
}

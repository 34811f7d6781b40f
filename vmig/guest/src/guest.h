/*
 * What the vmig guest's C files share: types, CPU and port helpers, the
 * VMM-shared pages, the per-vCPU configuration, and each file's entry points.
 */
#pragma once

#include <stdint.h>

#include "layout.h"

typedef uint64_t u64;
typedef uint32_t u32;
typedef uint16_t u16;
typedef uint8_t u8;

#define PAGE_SIZE 4096ULL

#define barrier() __asm__ volatile("" ::: "memory")

/* ---- port I/O and CPU helpers ------------------------------------------ */

static inline void outb(u16 port, u8 value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline u8 inb(u16 port)
{
    u8 value;
    __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static inline void outl(u16 port, u32 value)
{
    __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port));
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
    __asm__ volatile("pause");
}

static inline void halt(void)
{
    __asm__ volatile("hlt" ::: "memory");
}

/* ---- VMM-shared pages -------------------------------------------------- */

#define CFG(off) (((volatile u64 *)CONFIG_GPA)[(off) / 8])
#define ST(st, off) ((st)[(off) / 8])

static inline volatile u64 *status_block(u64 cpu)
{
    return (volatile u64 *)(STATUS_GPA + cpu * STATUS_STRIDE);
}

/* Tell vmig's status port; booted by Multiboot there is none (QEMU's fw_cfg is at 0x510). */
static inline void report(u64 cpu, u32 event)
{
    if (!CFG(CFG_MULTIBOOT_INFO))
        outl(STATUS_PORT, (event << 8) | (u32)cpu);
}

/* ---- configuration (config.c) ------------------------------------------ */

struct guest {
    u64 cpu;
    u64 ncpus;
    u64 workload;
    u64 order;
    u64 rate;     /* pages per second over all vCPUs, 0 = unpaced */
    u64 tsc_khz;
    u64 seed;
    u64 ws_bytes;
    volatile u32 *table;
    u64 ws_gpa;
    u64 ws_pages;
    u64 start;    /* this vCPU's slice: [start, end) */
    u64 end;
    u64 multiboot; /* address of the Multiboot information; 0 when vmig booted us */
    volatile u64 *st;
};

#define CMDLINE ((const char *)(CONFIG_GPA + CFG_CMDLINE))

/* Parse the command line in the config page into `g`; panics on a bad one. */
void read_config(struct guest *g, u64 cpu);
void banner(const struct guest *g);

/* ---- console (console.c) ----------------------------------------------- */

void console_lock(void);
void console_unlock(void);
void put_char(char c);
void put_str(const char *s);
void put_dec(u64 value);
__attribute__((noreturn)) void panic(u64 cpu, const char *why);
__attribute__((noreturn)) void panic_word(u64 cpu, const char *why, const char *word, u64 len);

/* ---- napping (nap.c) --------------------------------------------------- */

void timer_setup(const struct guest *g);
void nap(const struct guest *g, u64 us);

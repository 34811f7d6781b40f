/*
 * vmig guest: a bare-metal workload that dirties its memory and can prove,
 * after a migration, that every page still holds what it last wrote.
 *
 * start.S brings each vCPU to long mode and calls guest_main(cpu). The
 * contract with the VMM (config page, status page, ports, page stamps) is
 * vmig/guest/layout.py, from which layout.h is generated.
 *
 * Each vCPU owns a slice of the working set. It stamps every page of its
 * slice once (fill pass), then loops forever: heartbeat, serve a self-check
 * request, and either hlt (idle) or rewrite pages (dirty), paced with rdtsc
 * so the dirty rate is the same on emulated (PVM) and hardware KVM.
 *
 * On this project's PVM hosts every guest instruction is emulated (about one
 * million per second per vCPU), so the per-page path is kept short: counters
 * live in registers and the loop is specialised per order and pacing.
 *
 * Everything shared with the VMM is accessed through volatile pointers.
 * Globals live in .data/.bss, which the linker script keeps in the image.
 */
#include <stdint.h>

#include "layout.h"

typedef uint64_t u64;
typedef uint32_t u32;
typedef uint16_t u16;
typedef uint8_t u8;

#define PAGE_SIZE 4096ULL
#define PACING_SLACK_MS 50ULL /* fell behind more than this: skip, do not burst */
#define SEED_MIX 0x9E3779B97F4A7C15ULL /* golden-ratio constant: decorrelates vCPUs */
#define NO_BAD_PAGE (~0ULL)
/* Pages written per main-loop pass at most: amortises the heartbeat, the check
 * poll and rdtsc (every guest instruction is emulated on PVM) while keeping a
 * pass short enough (well under 1 ms) that checks are served promptly. */
#define DIRTY_BATCH 16ULL

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

static inline void report(u64 cpu, u32 event)
{
    outl(STATUS_PORT, (event << 8) | (u32)cpu);
}

/* ---- serial console (8250 THR/LSR), shared by all vCPUs ----------------- */

#define UART_THR 0
#define UART_LSR 5
#define UART_LSR_THRE 0x20

static volatile u32 serial_lock; /* 0 = free; zero in the image (.bss kept in it) */

static void console_lock(void)
{
    for (;;) {
        u32 expected = 0;
        if (__atomic_compare_exchange_n(&serial_lock, &expected, 1, 0, __ATOMIC_ACQUIRE,
                                        __ATOMIC_RELAXED))
            return;
        while (serial_lock)
            cpu_relax();
    }
}

static void console_unlock(void)
{
    __atomic_store_n(&serial_lock, 0, __ATOMIC_RELEASE);
}

static void put_char(char c)
{
    while (!(inb(SERIAL_PORT + UART_LSR) & UART_LSR_THRE))
        cpu_relax();
    outb(SERIAL_PORT + UART_THR, (u8)c);
}

static void put_str(const char *s)
{
    while (*s)
        put_char(*s++);
}

static void put_dec(u64 value)
{
    char buf[21];
    int i = sizeof(buf) - 1;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    put_str(&buf[i]);
}

/* ---- configuration ----------------------------------------------------- */

struct guest {
    u64 cpu;
    u64 ncpus;
    u64 workload;
    u64 order;
    u64 rate;     /* pages per second over all vCPUs, 0 = unpaced */
    u64 tsc_khz;
    volatile u32 *table;
    u64 ws_gpa;
    u64 ws_pages;
    u64 start;    /* this vCPU's slice: [start, end) */
    u64 end;
    volatile u64 *st;
};

static __attribute__((noreturn)) void panic(u64 cpu, const char *why)
{
    console_lock();
    put_str("vmig guest: cpu ");
    put_dec(cpu);
    put_str(" panic: ");
    put_str(why);
    put_char('\n');
    console_unlock();
    report(cpu, EVENT_PANIC);
    for (;;)
        halt();
}

/* Read the config page once; the VMM changes only CFG_CHECK_REQUEST later. */
static void read_config(struct guest *g, u64 cpu)
{
    g->cpu = cpu;
    g->st = status_block(cpu);
    if (CFG(CFG_MAGIC) != CONFIG_MAGIC)
        panic(cpu, "bad config magic");
    g->ncpus = CFG(CFG_NCPUS);
    g->workload = CFG(CFG_WORKLOAD);
    g->order = CFG(CFG_ORDER);
    g->rate = CFG(CFG_DIRTY_RATE);
    g->tsc_khz = CFG(CFG_TSC_KHZ);
    g->table = (volatile u32 *)CFG(CFG_TABLE_GPA);
    g->ws_gpa = CFG(CFG_WS_GPA);
    g->ws_pages = CFG(CFG_WS_PAGES);
    if (g->ncpus == 0 || g->ncpus > MAX_CPUS || cpu >= g->ncpus)
        panic(cpu, "bad vCPU count in config");
    if (g->workload != WORKLOAD_IDLE && g->workload != WORKLOAD_DIRTY)
        panic(cpu, "bad workload in config");
    if (g->order != ORDER_SEQUENTIAL && g->order != ORDER_RANDOM)
        panic(cpu, "bad order in config");
    if (g->workload == WORKLOAD_DIRTY && g->rate && !g->tsc_khz)
        panic(cpu, "dirty rate set but tsc_khz is 0");
    if (g->ws_gpa % PAGE_SIZE || g->ws_pages > 0xffffffffULL)
        panic(cpu, "bad working set in config");
    if (g->ws_pages && !g->table)
        panic(cpu, "no generation table in config");
    g->start = cpu * g->ws_pages / g->ncpus;
    g->end = (cpu + 1) * g->ws_pages / g->ncpus;
}

static void banner(const struct guest *g)
{
    console_lock();
    put_str("vmig guest: ");
    put_dec(g->ncpus);
    put_str(" vCPUs, workload ");
    put_str(g->workload == WORKLOAD_DIRTY ? "dirty" : "idle");
    if (g->workload == WORKLOAD_DIRTY) {
        put_str(", order ");
        put_str(g->order == ORDER_RANDOM ? "random" : "sequential");
        put_str(", rate ");
        if (g->rate) {
            put_dec(g->rate);
            put_str(" pages/s");
        } else {
            put_str("unlimited");
        }
    }
    put_str(", working set ");
    put_dec(g->ws_pages);
    put_str(" pages\n");
    console_unlock();
}

/* ---- stamping and checking --------------------------------------------- */

static inline volatile u64 *ws_page(u64 ws_gpa, u64 idx)
{
    return (volatile u64 *)(ws_gpa + idx * PAGE_SIZE);
}

/*
 * Give page `idx` its next generation: stamp the page, then record it in the
 * table. Kept to a handful of instructions: on PVM every guest instruction is
 * emulated, so this is the cost of one dirtied page.
 */
static inline __attribute__((always_inline)) void stamp_page(volatile u32 *table, u64 ws_gpa,
                                                             u64 idx)
{
    volatile u64 *page = ws_page(ws_gpa, idx);
    u32 gen = table[idx] + 1;
    gen += (gen == 0); /* 0 means "never written": skip it on wrap-around */
    page[0] = STAMP_MAGIC | idx;
    page[1] = gen;
    table[idx] = gen;
}

/* Check every page of this vCPU's slice against the table and publish the result. */
static __attribute__((noinline)) void self_check(const struct guest *g, u64 request)
{
    volatile u32 *table = g->table;
    u64 ws_gpa = g->ws_gpa;
    u64 bad = 0, first_bad = NO_BAD_PAGE;
    for (u64 idx = g->start; idx < g->end; idx++) {
        volatile u64 *page = ws_page(ws_gpa, idx);
        u32 gen = table[idx];
        u64 w0 = page[0], w1 = page[1];
        int ok = gen == 0 ? (w0 == 0 && w1 == 0) : (w0 == (STAMP_MAGIC | idx) && w1 == gen);
        if (__builtin_expect(!ok, 0)) {
            if (!bad)
                first_bad = idx;
            bad++;
        }
    }
    ST(g->st, ST_CHECK_PAGES) = g->end - g->start;
    ST(g->st, ST_CHECK_BAD) = bad;
    ST(g->st, ST_FIRST_BAD) = first_bad;
    barrier(); /* results are visible before the VMM sees check_done move */
    ST(g->st, ST_CHECK_DONE) = request;
    barrier();
    report(g->cpu, EVENT_CHECK_DONE);

    if (g->cpu == 0 || bad) {
        console_lock();
        put_str("vmig guest: check ");
        put_dec(request);
        put_str(" cpu ");
        put_dec(g->cpu);
        put_str(": ");
        put_dec(g->end - g->start);
        put_str(" pages, ");
        put_dec(bad);
        put_str(" bad");
        if (bad) {
            put_str(", first bad page ");
            put_dec(first_bad);
        }
        put_char('\n');
        console_unlock();
    }
}

static inline u64 xorshift64(u64 x)
{
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
}

/* ---- main loops -------------------------------------------------------- */

/*
 * Serve a pending self-check request; `done` is this vCPU's ST_CHECK_DONE,
 * kept in a register (the guest is its only writer).
 */
#define SERVE_CHECK(g, done)                                                   \
    do {                                                                       \
        u64 request_ = CFG(CFG_CHECK_REQUEST);                                 \
        if (__builtin_expect(request_ != (done), 0)) {                         \
            self_check((g), request_);                                         \
            (done) = request_;                                                 \
        }                                                                      \
    } while (0)

/* WORKLOAD_IDLE (or an empty slice): heartbeat, checks, hlt until the VMM re-enters. */
static __attribute__((noreturn)) void idle_loop(const struct guest *g)
{
    volatile u64 *st = g->st;
    u64 hb = ST(st, ST_HEARTBEAT), done = ST(st, ST_CHECK_DONE);
    for (;;) {
        ST(st, ST_HEARTBEAT) = ++hb;
        SERVE_CHECK(g, done);
        halt();
    }
}

/*
 * WORKLOAD_DIRTY, specialised (through constant arguments) per order and
 * pacing so that the per-page path carries no dead branches. The counters
 * live in registers and are stored, not incremented in memory.
 */
static inline __attribute__((always_inline, noreturn)) void dirty_loop(const struct guest *g,
                                                                       const int random,
                                                                       const int paced)
{
    volatile u64 *st = g->st;
    volatile u32 *table = g->table;
    const u64 ws_gpa = g->ws_gpa, start = g->start, end = g->end, len = g->end - g->start;
    u64 hb = ST(st, ST_HEARTBEAT), pw = ST(st, ST_PAGES_WRITTEN), done = ST(st, ST_CHECK_DONE);
    u64 next = start; /* ORDER_SEQUENTIAL cursor */
    u64 rng = CFG(CFG_SEED) ^ ((g->cpu + 1) * SEED_MIX);
    if (!rng)
        rng = SEED_MIX;
    /* TSC ticks between this vCPU's page writes (the rate is for all vCPUs). */
    const u64 interval = paced ? g->tsc_khz * 1000 * g->ncpus / g->rate : 0;
    const u64 slack = g->tsc_khz * PACING_SLACK_MS;
    u64 deadline = rdtsc();

    for (;;) {
        ST(st, ST_HEARTBEAT) = ++hb;
        SERVE_CHECK(g, done);

        u64 batch = DIRTY_BATCH;
        if (paced) {
            u64 now = rdtsc();
            if (now < deadline) {
                /* Not yet time; but a TSC far behind the deadline moved backwards
                 * (e.g. migrated to a host whose TSC is behind): restart the clock. */
                if (deadline - now <= interval + slack) {
                    /* Sleep instead of spinning: the VMM re-enters within a few ms
                     * and the pages that fell due meanwhile go out in batches. On a
                     * 2-core host a spinning guest would starve the migration. */
                    halt();
                    continue;
                }
                deadline = now;
            }
            if (now - deadline > slack) /* paused or migrated: no catch-up burst */
                deadline = now;
            /* Every page whose deadline has passed, at most DIRTY_BATCH per pass. */
            batch = (now - deadline) / interval + 1;
            if (batch > DIRTY_BATCH)
                batch = DIRTY_BATCH;
            deadline += batch * interval;
        }

        pw += batch;
        do {
            u64 idx;
            if (random) {
                rng = xorshift64(rng);
                idx = start + rng % len;
            } else {
                idx = next++;
                if (next == end)
                    next = start;
            }
            stamp_page(table, ws_gpa, idx);
        } while (--batch);
        ST(st, ST_PAGES_WRITTEN) = pw;
    }
}

/* ---- main -------------------------------------------------------------- */

void __attribute__((noreturn, used)) guest_main(u64 cpu);

void guest_main(u64 cpu)
{
    struct guest g;
    volatile u64 *st = status_block(cpu);

    ST(st, ST_STATE) = CPU_STATE_LONG_MODE;
    report(cpu, EVENT_BOOTED);
    read_config(&g, cpu);
    if (cpu == 0)
        banner(&g);

    ST(st, ST_STATE) = CPU_STATE_FILLING;
    u64 pw = ST(st, ST_PAGES_WRITTEN);
    for (u64 idx = g.start; idx < g.end; idx++) {
        stamp_page(g.table, g.ws_gpa, idx);
        ST(st, ST_PAGES_WRITTEN) = ++pw;
    }
    ST(st, ST_STATE) = CPU_STATE_RUNNING;

    int paced = g.rate && g.tsc_khz * 1000 * g.ncpus / g.rate > 0;
    if (g.workload == WORKLOAD_IDLE || g.start == g.end)
        idle_loop(&g);
    else if (g.order == ORDER_RANDOM && paced)
        dirty_loop(&g, 1, 1);
    else if (g.order == ORDER_RANDOM)
        dirty_loop(&g, 1, 0);
    else if (paced)
        dirty_loop(&g, 0, 1);
    else
        dirty_loop(&g, 0, 0);
}

/*
 * vmig guest: a bare-metal workload that dirties its memory and can prove,
 * after a migration, that every page still holds what it last wrote.
 *
 * start.S brings each vCPU to long mode and calls guest_main(cpu). The
 * contract with the VMM (config page, status page, ports, page stamps) is
 * vmig/guest/layout.py, from which layout.h is generated; the parameters come
 * as a command line in the config page (syntax: vmig/guest/cmdline.py), written
 * there by vmig or, booted by Multiboot (QEMU -kernel), copied there by start.S.
 *
 * Each vCPU owns a slice of the working set. It stamps every page of its
 * slice once (fill pass), then loops forever: heartbeat, serve a self-check
 * request, and either nap (idle) or rewrite pages (dirty), paced with rdtsc
 * so the dirty rate is the same on emulated (PVM) and hardware KVM. A nap is
 * hlt under vmig and the local APIC's timer under a Multiboot loader (nap.c).
 *
 * The other files: config.c (the command line), console.c (COM1, panic),
 * nap.c; guest.h is what they share.
 *
 * On this project's PVM hosts every guest instruction is emulated (about one
 * million per second per vCPU), so the per-page path is kept short: counters
 * live in registers and the loop is specialised per order and pacing.
 *
 * Everything shared with the VMM is accessed through volatile pointers.
 * Globals live in .data/.bss, which the linker script keeps in the image.
 */
#include "guest.h"

#define PACING_SLACK_MS 50ULL /* fell behind more than this: skip, do not burst */
#define SEED_MIX 0x9E3779B97F4A7C15ULL /* golden-ratio constant: decorrelates vCPUs */
#define NO_BAD_PAGE (~0ULL)
/* Pages written per main-loop pass at most: amortises the heartbeat, the check
 * poll and rdtsc (every guest instruction is emulated on PVM) while keeping a
 * pass short enough (well under 1 ms) that checks are served promptly. */
#define DIRTY_BATCH 16ULL
/* Booted by Multiboot, a nap lasts as long as vmig's VMM leaves a halted vCPU
 * (vmm/vcpu_thread.py HLT_WAIT_S, IDLE_HLT_WAIT_S): 2 ms dirty, 20 ms idle. */
#define NAP_US_DIRTY 2000ULL
#define NAP_US_IDLE 20000ULL

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
        nap(g, NAP_US_IDLE);
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
    u64 rng = g->seed ^ ((g->cpu + 1) * SEED_MIX);
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
                    /* Booted by vmig, sleep instead of spinning: the VMM re-enters
                     * within a few ms and the pages that fell due meanwhile go out in
                     * batches. On a 2-core host a spinning guest would starve the
                     * migration. (Booted by Multiboot, the APIC timer wakes it.) */
                    nap(g, NAP_US_DIRTY);
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
    if (cpu == 0) {
        banner(&g);
        timer_setup(&g);
    }

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

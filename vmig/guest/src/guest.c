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
/* Booted by Multiboot, an idle vCPU spins this long between heartbeats (it cannot hlt);
 * without tsc_khz, this many TSC ticks. */
#define IDLE_NAP_MS 1ULL
#define IDLE_NAP_TICKS 2000000ULL

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

static void put_word(const char *s, u64 len)
{
    for (u64 i = 0; i < len; i++)
        put_char(s[i]);
}

/* Stop this vCPU for good, saying why on the console (and `len` bytes of `word`). */
static __attribute__((noreturn)) void panic_word(u64 cpu, const char *why, const char *word,
                                                 u64 len)
{
    console_lock();
    put_str("vmig guest: cpu ");
    put_dec(cpu);
    put_str(" panic: ");
    put_str(why);
    if (len) {
        put_str(": ");
        put_word(word, len);
    }
    put_char('\n');
    console_unlock();
    report(cpu, EVENT_PANIC);
    for (;;)
        halt();
}

static __attribute__((noreturn)) void panic(u64 cpu, const char *why)
{
    panic_word(cpu, why, "", 0);
}

/* ---- command line (syntax: vmig/guest/cmdline.py) ----------------------- */

#define CMDLINE ((const char *)(CONFIG_GPA + CFG_CMDLINE))
#define NUMBER_PLAIN 0
#define NUMBER_SIZE 1 /* may end in K, M or G */

static inline int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* [s, s + len) is exactly `word`. */
static int word_is(const char *s, u64 len, const char *word)
{
    u64 i = 0;
    for (; i < len; i++)
        if (!word[i] || s[i] != word[i])
            return 0;
    return word[i] == 0;
}

/* Parse [s, s + len): decimal or 0x hex, with a K/M/G suffix for NUMBER_SIZE. 0 = bad. */
static int parse_number(const char *s, u64 len, int kind, u64 *out)
{
    u64 value = 0, base = 10, i = 0, shift = 0;
    if (kind == NUMBER_SIZE && len) {
        char unit = s[len - 1];
        shift = unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0;
        if (shift)
            len--;
    }
    if (len > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        i = 2;
    }
    if (i == len)
        return 0;
    for (; i < len; i++) {
        char c = s[i];
        u64 digit;
        if (c >= '0' && c <= '9')
            digit = (u64)(c - '0');
        else if (base == 16 && c >= 'a' && c <= 'f')
            digit = (u64)(c - 'a' + 10);
        else if (base == 16 && c >= 'A' && c <= 'F')
            digit = (u64)(c - 'A' + 10);
        else
            return 0;
        if (value > (~0ULL - digit) / base)
            return 0;
        value = value * base + digit;
    }
    if (value > (~0ULL >> shift))
        return 0;
    *out = value << shift;
    return 1;
}

struct number_key {
    const char *key;
    u64 offset; /* of the u64 field in struct guest */
    int kind;
};

static const struct number_key NUMBER_KEYS[] = {
    {"cpus", __builtin_offsetof(struct guest, ncpus), NUMBER_PLAIN},
    {"dirty_rate", __builtin_offsetof(struct guest, rate), NUMBER_PLAIN},
    {"working_set", __builtin_offsetof(struct guest, ws_bytes), NUMBER_SIZE},
    {"seed", __builtin_offsetof(struct guest, seed), NUMBER_PLAIN},
    {"tsc_khz", __builtin_offsetof(struct guest, tsc_khz), NUMBER_PLAIN},
};

struct choice_key {
    const char *key;
    u64 offset; /* of the u64 field in struct guest */
    const char *words[2];
    u64 values[2];
};

static const struct choice_key CHOICE_KEYS[] = {
    {"workload", __builtin_offsetof(struct guest, workload), {"idle", "dirty"},
     {WORKLOAD_IDLE, WORKLOAD_DIRTY}},
    {"order", __builtin_offsetof(struct guest, order), {"sequential", "random"},
     {ORDER_SEQUENTIAL, ORDER_RANDOM}},
};

/* One `key=value` word; a bad key or value stops the vCPU with a panic naming it. */
static void parse_setting(struct guest *g, const char *word, u64 len)
{
    u64 klen = 0;
    while (klen < len && word[klen] != '=')
        klen++;
    if (klen == len)
        return; /* no '=': e.g. the kernel's path, which QEMU and GRUB put first */
    for (u64 i = 0; i < klen; i++)
        if (word[i] == '/')
            return; /* a path with '=' in it */
    const char *value = word + klen + 1;
    u64 vlen = len - klen - 1;
    for (u64 i = 0; i < sizeof(CHOICE_KEYS) / sizeof(CHOICE_KEYS[0]); i++) {
        const struct choice_key *k = &CHOICE_KEYS[i];
        if (!word_is(word, klen, k->key))
            continue;
        for (u64 j = 0; j < 2; j++) {
            if (word_is(value, vlen, k->words[j])) {
                *(u64 *)((char *)g + k->offset) = k->values[j];
                return;
            }
        }
        panic_word(g->cpu, "bad value in command line", word, len);
    }
    for (u64 i = 0; i < sizeof(NUMBER_KEYS) / sizeof(NUMBER_KEYS[0]); i++) {
        const struct number_key *k = &NUMBER_KEYS[i];
        if (!word_is(word, klen, k->key))
            continue;
        if (!parse_number(value, vlen, k->kind, (u64 *)((char *)g + k->offset)))
            panic_word(g->cpu, "bad number in command line", word, len);
        return;
    }
    panic_word(g->cpu, "unknown key in command line", word, len);
}

static void parse_cmdline(struct guest *g)
{
    const char *p = CMDLINE, *end = CMDLINE + CMDLINE_SIZE - 1;
    while (p < end && *p) {
        if (is_space(*p)) {
            p++;
            continue;
        }
        const char *word = p;
        while (p < end && *p && !is_space(*p))
            p++;
        parse_setting(g, word, (u64)(p - word));
    }
}

/* Read the config page once; the VMM changes only CFG_CHECK_REQUEST later. */
static void read_config(struct guest *g, u64 cpu)
{
    g->cpu = cpu;
    g->st = status_block(cpu);
    if (CFG(CFG_MAGIC) != CONFIG_MAGIC)
        panic(cpu, "bad config magic");
    g->multiboot = CFG(CFG_MULTIBOOT_INFO);
    g->ncpus = DEFAULT_CPUS;
    g->workload = DEFAULT_WORKLOAD;
    g->order = DEFAULT_ORDER;
    g->rate = DEFAULT_DIRTY_RATE;
    g->ws_bytes = DEFAULT_WORKING_SET;
    g->seed = DEFAULT_SEED;
    g->tsc_khz = DEFAULT_TSC_KHZ;
    parse_cmdline(g);
    if (g->ncpus == 0 || g->ncpus > MAX_CPUS || cpu >= g->ncpus)
        panic(cpu, "bad vCPU count in command line");
    if (g->multiboot && g->ncpus != 1)
        panic(cpu, "booted by Multiboot, there is one vCPU: cpus must be 1");
    if (g->workload == WORKLOAD_DIRTY && g->rate && !g->tsc_khz)
        panic(cpu, "dirty rate set but tsc_khz is 0");
    if (g->ws_bytes % PAGE_SIZE || g->ws_bytes / PAGE_SIZE > 0xffffffffULL)
        panic(cpu, "bad working set in command line");
    g->ws_pages = g->ws_bytes / PAGE_SIZE;
    g->table = (volatile u32 *)TABLE_GPA;
    /* layout.working_set_gpa: after the generation table, 2 MiB aligned. */
    g->ws_gpa = (TABLE_GPA + 4 * g->ws_pages + LARGE_PAGE - 1) & ~(LARGE_PAGE - 1);
    if (g->multiboot) {
        volatile u32 *mbi = (volatile u32 *)g->multiboot;
        u64 top = MULTIBOOT_MAP_GIBS * 0x40000000ULL;
        if (mbi[MBI_FLAGS / 4] & MULTIBOOT_INFO_MEMORY)
            top = 0x100000ULL + (u64)mbi[MBI_MEM_UPPER / 4] * 1024;
        if (g->ws_gpa + g->ws_pages * PAGE_SIZE > top)
            panic(cpu, "the working set does not fit in the memory below the first hole");
    }
    g->start = cpu * g->ws_pages / g->ncpus;
    g->end = (cpu + 1) * g->ws_pages / g->ncpus;
}

/*
 * Wait until about TSC `until`. Booted by vmig: hlt, and the VMM re-enters within
 * a few ms. Booted by Multiboot nobody would wake a hlt (no interrupts are set up),
 * so spin.
 */
static inline void wait_until(const struct guest *g, u64 until)
{
    if (!g->multiboot) {
        halt();
        return;
    }
    while (rdtsc() < until)
        cpu_relax();
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
    put_str(" pages, booted by ");
    put_str(g->multiboot ? "Multiboot" : "vmig");
    put_str("\nvmig guest: command line: ");
    put_str(CMDLINE);
    put_char('\n');
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
    const u64 nap = g->tsc_khz ? g->tsc_khz * IDLE_NAP_MS : IDLE_NAP_TICKS;
    for (;;) {
        ST(st, ST_HEARTBEAT) = ++hb;
        SERVE_CHECK(g, done);
        wait_until(g, rdtsc() + nap);
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
                     * migration. (Booted by Multiboot, wait_until spins.) */
                    wait_until(g, deadline);
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

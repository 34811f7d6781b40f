/*
 * vmig guest configuration: the command line in the config page (syntax:
 * vmig/guest/cmdline.py, which also writes layout.h's DEFAULT_* values), parsed
 * by every vCPU on its own (it only reads the page).
 */
#include "guest.h"

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
void read_config(struct guest *g, u64 cpu)
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

void banner(const struct guest *g)
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

/*
 * vmig guest console: COM1 (an 8250), shared by all vCPUs under a spinlock,
 * and the panic that stops a vCPU with a reason.
 */
#include "guest.h"

/* ---- serial console (8250 THR/LSR), shared by all vCPUs ----------------- */

#define UART_THR 0
#define UART_LSR 5
#define UART_LSR_THRE 0x20

static volatile u32 serial_lock; /* 0 = free; zero in the image (.bss kept in it) */

void console_lock(void)
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

void console_unlock(void)
{
    __atomic_store_n(&serial_lock, 0, __ATOMIC_RELEASE);
}

void put_char(char c)
{
    while (!(inb(SERIAL_PORT + UART_LSR) & UART_LSR_THRE))
        cpu_relax();
    outb(SERIAL_PORT + UART_THR, (u8)c);
}

void put_str(const char *s)
{
    while (*s)
        put_char(*s++);
}

void put_dec(u64 value)
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

static void put_word(const char *s, u64 len)
{
    for (u64 i = 0; i < len; i++)
        put_char(s[i]);
}

/* Stop this vCPU for good, saying why on the console (and `len` bytes of `word`). */
__attribute__((noreturn)) void panic_word(u64 cpu, const char *why, const char *word,
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

__attribute__((noreturn)) void panic(u64 cpu, const char *why)
{
    panic_word(cpu, why, "", 0);
}

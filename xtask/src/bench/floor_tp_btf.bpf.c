// SPDX-License-Identifier: GPL-2.0
//
// The bench's tp_btf floor programs: the least a program of `ka_state`'s
// kind (tp_btf on inet_sock_set_state) or of the timer hooks' can cost on
// this machine. Built by `cargo xtask bench` with clang (no libbpf headers
// needed) and loaded with aya; the bench attaches one at a time:
//
//   floor_empty   returns at once: the hook's dispatch alone.
//   floor_clock   takes a timestamp (bpf_ktime_get_ns), as every event does.
//   floor_emit    takes a timestamp and writes one 64-byte record into this
//                 CPU's ring, read by a thread every 20 ms, without waking
//                 it: the skeleton of every event `ka_state` emits, with no
//                 socket field read, no filter and no counter.
//   floor_timer_empty  returns at once, on timer_expire_entry: the timer
//                 hooks' dispatch alone.
//
// Rings: one per CPU as keepalive has, for CPUs 0-7 (higher CPUs share
// them, which only makes the floor dearer on bigger machines).

typedef unsigned long long u64;
typedef unsigned int u32;

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]

// Helper numbers from include/uapi/linux/bpf.h.
static u64 (*bpf_ktime_get_ns)(void) = (void *)5;
static u32 (*bpf_get_smp_processor_id)(void) = (void *)8;
static void *(*bpf_ringbuf_reserve)(void *ringbuf, u64 size, u64 flags) = (void *)131;
static void (*bpf_ringbuf_submit)(void *data, u64 flags) = (void *)132;

#define BPF_MAP_TYPE_RINGBUF 27
#define BPF_RB_NO_WAKEUP 1
// keepalive's record of a state change: its 64-byte head.
#define RECORD_BYTES 64
#define RING_BYTES (2 << 20)

#define RING(n)                                                                \
    struct {                                                                   \
        __uint(type, BPF_MAP_TYPE_RINGBUF);                                    \
        __uint(max_entries, RING_BYTES);                                       \
    } ring##n SEC(".maps");

RING(0) RING(1) RING(2) RING(3) RING(4) RING(5) RING(6) RING(7)

// The verifier needs a constant map at each call: one call per ring.
static __attribute__((always_inline)) u64 *reserve(u32 cpu)
{
    switch (cpu & 7) {
    case 0: return bpf_ringbuf_reserve(&ring0, RECORD_BYTES, 0);
    case 1: return bpf_ringbuf_reserve(&ring1, RECORD_BYTES, 0);
    case 2: return bpf_ringbuf_reserve(&ring2, RECORD_BYTES, 0);
    case 3: return bpf_ringbuf_reserve(&ring3, RECORD_BYTES, 0);
    case 4: return bpf_ringbuf_reserve(&ring4, RECORD_BYTES, 0);
    case 5: return bpf_ringbuf_reserve(&ring5, RECORD_BYTES, 0);
    case 6: return bpf_ringbuf_reserve(&ring6, RECORD_BYTES, 0);
    default: return bpf_ringbuf_reserve(&ring7, RECORD_BYTES, 0);
    }
}

// TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
SEC("tp_btf/inet_sock_set_state")
int floor_empty(u64 *ctx)
{
    return 0;
}

SEC("tp_btf/inet_sock_set_state")
int floor_clock(u64 *ctx)
{
    volatile u64 ts = bpf_ktime_get_ns();
    (void)ts;
    return 0;
}

SEC("tp_btf/inet_sock_set_state")
int floor_emit(u64 *ctx)
{
    u64 *rec = reserve(bpf_get_smp_processor_id());
    if (!rec)
        return 0;
    rec[0] = bpf_ktime_get_ns();
    // The context's words (socket pointer, old and new state) stand in for
    // the fields an event carries; every byte of the record is written.
    rec[1] = ctx[0];
    rec[2] = ctx[1];
    rec[3] = ctx[2];
    rec[4] = 0;
    rec[5] = 0;
    rec[6] = 0;
    rec[7] = 0;
    bpf_ringbuf_submit(rec, BPF_RB_NO_WAKEUP);
    return 0;
}

// TP_PROTO(struct timer_list *timer, unsigned long baseclk)
SEC("tp_btf/timer_expire_entry")
int floor_timer_empty(u64 *ctx)
{
    return 0;
}

char LICENSE[] SEC("license") = "GPL";

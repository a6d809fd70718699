/* raw_kvm.c - the hardware limit: the same measurements as kvmpy, in plain C on the KVM API.
 *
 * Compiled by the benchmark runner (`python -m benchmarks`) with `cc -O2`. Each call does
 * one measurement and prints one JSON object on stdout; errors go to stderr, exit status 2.
 *
 *   raw_kvm compute GUEST.bin N      compute64: N LCG steps inside the VM
 *   raw_kvm native  N                the same N LCG steps in this process, no VM
 *   raw_kvm create  N [MAPS]         N x (VM + 64 MiB memory slot + 1 vCPU, then close),
 *                                    optionally with the process padded to MAPS mappings
 *   raw_kvm regs    N                N x (KVM_GET_REGS + KVM_SET_REGS)
 *   raw_kvm multi   GUEST.bin N T    one VM, T vCPUs on T threads, each runs counter64 N
 *   raw_kvm serve   GUEST.bin        counter64 (N OUTs to 0x11, then OUT to 0xF4) on one VM
 *                                    kept for many runs: reads N from each stdin line, runs
 *                                    the guest from its entry, answers one JSON line
 *   raw_kvm reset   GUEST.bin MIB    snapshot64 in a MIB MiB VM with dirty logging, kept for
 *                                    many runs: reads "N K F" from each stdin line and does K
 *                                    fuzzing-style iterations (registers through kvm_run's
 *                                    sync area, run to the OUT to 0xF4 after N pages were
 *                                    written, KVM_GET_DIRTY_LOG, copy the dirty pages back
 *                                    from a clean copy; with F=1 also KVM_SET_XSAVE), answers
 *                                    one JSON line
 *   raw_kvm fuzz    IMAGE.bin ENTRY  a kvmpy fuzz target's flat image (objcopy -O binary of
 *                                    its ELF, linked at 0x100000) with dirty logging, kept
 *                                    for many runs: reads "HEXINPUT K" from each stdin line
 *                                    and does K fuzzing iterations with that input (write
 *                                    it, registers through kvm_run's sync area: ENTRY with
 *                                    RDI = input, RSI = length and a return address whose
 *                                    code is OUT to 0xF4; run to that OUT;
 *                                    KVM_GET_DIRTY_LOG; copy the dirty pages back), answers
 *                                    one JSON line
 *
 * The VM setup, shared with cext_exit.c, is in raw_kvm.h: kvmpy's
 * `setup_long_mode(user=True)` (GDT at 0x1000, TSS with a full I/O permission bitmap at
 * 0x2000, PML4/PDPT/PD at 0x5000/0x6000/0x7000 identity-mapping 1 GiB with 2 MiB pages,
 * CPL3 64-bit code and data segments, IOPL=3).
 */
#include "raw_kvm.h"

#include <pthread.h>

static int kvm_run(vcpu_t *c) {
    int rc;
    do rc = ioctl(c->fd, KVM_RUN, 0);
    while (rc < 0 && (errno == EINTR || errno == EAGAIN));
    if (rc < 0) DIE("KVM_RUN");
    return c->run->exit_reason;
}

typedef struct {
    uint64_t exits, device_writes, device_sum, result;
    double seconds;
} loop_result_t;

/* The run loop of a minimal VMM: OUTs to 0x11 go to a "device" (a byte sum), OUT to 0xF4
 * ends the run. Anything else is an error. */
static loop_result_t run_loop(vcpu_t *c) {
    loop_result_t R = {0};
    double t0 = now();
    for (;;) {
        int e = kvm_run(c);
        R.exits++;
        struct kvm_run *r = c->run;
        if (e != KVM_EXIT_IO || r->io.direction != KVM_EXIT_IO_OUT) {
            errno = 0;
            DIE("unexpected exit %d after %llu exits", e, (unsigned long long)R.exits);
        }
        uint8_t *d = (uint8_t *)r + r->io.data_offset;
        if (r->io.port == PORT_DEVICE) {
            uint32_t v = 0;
            memcpy(&v, d, r->io.size);
            R.device_writes++;
            R.device_sum += v;
            if (R.device_writes <= 2) R.result |= (uint64_t)v << (32 * (R.device_writes - 1));
        } else if (r->io.port == PORT_EXIT) {
            break;
        } else {
            errno = 0;
            DIE("OUT to unexpected port 0x%x", r->io.port);
        }
    }
    R.seconds = now() - t0;
    return R;
}

static uint64_t parse_u64(const char *s) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end || end == s) {
        errno = EINVAL;
        DIE("bad number '%s'", s);
    }
    return v;
}

static void mode_compute(const char *bin, uint64_t n) {
    vm_t v;
    vcpu_t c;
    boot_one(&v, &c, bin, n);
    loop_result_t R = run_loop(&c);
    struct kvm_regs gr;
    if (ioctl(c.fd, KVM_GET_REGS, &gr) < 0) DIE("KVM_GET_REGS");
    printf("{\"mode\": \"compute\", \"n\": %llu, \"exits\": %llu, \"seconds\": %.9f, "
           "\"result\": %llu, \"rbx\": %llu}\n",
           (unsigned long long)n, (unsigned long long)R.exits, R.seconds,
           (unsigned long long)R.result, (unsigned long long)gr.rbx);
    vcpu_destroy(&c);
    vm_destroy(&v);
}

static void mode_native(uint64_t n) {
    double t0 = now();
    uint64_t x = 0;
    for (uint64_t i = 0; i < n; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        __asm__ volatile("" : "+r"(x)); /* keep the loop as written: imul, add per step */
    }
    double dt = now() - t0;
    printf("{\"mode\": \"native\", \"n\": %llu, \"seconds\": %.9f, \"result\": %llu}\n",
           (unsigned long long)n, dt, (unsigned long long)x);
}

static uint64_t count_mappings(void) {
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f) DIE("open /proc/self/maps");
    uint64_t lines = 0;
    int ch;
    while ((ch = fgetc(f)) != EOF) lines += ch == '\n';
    fclose(f);
    return lines;
}

/* Adds small anonymous mappings (each split in two by mprotect, so they never merge) until
 * this process has at least `target` memory mappings (VMAs), like a big Python process. */
static uint64_t pad_mappings(uint64_t target) {
    uint64_t have = count_mappings();
    while (have < target) {
        for (int i = 0; i < 64 && have < target; i++, have += 2) {
            uint8_t *p = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                              -1, 0);
            if (p == MAP_FAILED || mprotect(p, 4096, PROT_READ) < 0) DIE("mmap padding");
        }
        have = count_mappings();
    }
    return have;
}

static void mode_create(uint64_t n, uint64_t mappings) {
    uint64_t have = pad_mappings(mappings);
    double t0 = now();
    for (uint64_t i = 0; i < n; i++) {
        vm_t v;
        vcpu_t c;
        vm_create(&v, 64u << 20);
        vcpu_create(&v, &c, 0);
        vcpu_destroy(&c);
        vm_destroy(&v);
    }
    double dt = now() - t0;
    printf("{\"mode\": \"create\", \"n\": %llu, \"mappings\": %llu, \"seconds\": %.9f}\n",
           (unsigned long long)n, (unsigned long long)have, dt);
}

static void mode_regs(uint64_t n) {
    vm_t v;
    vcpu_t c;
    vm_create(&v, GUEST_MEM);
    write_tables(&v);
    vcpu_create(&v, &c, 0);
    setup_long(&c, 0);
    struct kvm_regs r;
    double t0 = now();
    for (uint64_t i = 0; i < n; i++) {
        if (ioctl(c.fd, KVM_GET_REGS, &r) < 0) DIE("KVM_GET_REGS");
        r.rax = i;
        if (ioctl(c.fd, KVM_SET_REGS, &r) < 0) DIE("KVM_SET_REGS");
    }
    double dt = now() - t0;
    printf("{\"mode\": \"regs\", \"n\": %llu, \"seconds\": %.9f}\n", (unsigned long long)n, dt);
    vcpu_destroy(&c);
    vm_destroy(&v);
}

static void mode_serve(const char *bin) {
    vm_t v;
    vcpu_t c;
    boot_one(&v, &c, bin, 0);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        uint64_t n = parse_u64(line);
        struct kvm_regs r = {.rip = LOAD_ADDR, .rdi = n, .rflags = 0x3002};
        if (ioctl(c.fd, KVM_SET_REGS, &r) < 0) DIE("KVM_SET_REGS");
        loop_result_t R = run_loop(&c);
        if (R.device_writes != n) {
            errno = 0;
            DIE("expected %llu device writes, got %llu", (unsigned long long)n,
                (unsigned long long)R.device_writes);
        }
        printf("{\"mode\": \"serve\", \"n\": %llu, \"exits\": %llu, \"seconds\": %.9f}\n",
               (unsigned long long)n, (unsigned long long)R.exits, R.seconds);
        fflush(stdout);
    }
    vcpu_destroy(&c);
    vm_destroy(&v);
}

/* Dirty logging on the VM's one slot, and a clean copy of its first 2 MiB (the rest of
 * guest memory stays zero on both sides) to copy dirty pages back from. */
typedef struct {
    uint64_t *bitmap;
    size_t words;
    uint8_t *clean;
    struct kvm_dirty_log log;
} dirty_t;

static void dirty_start(vm_t *v, dirty_t *d) {
    struct kvm_userspace_memory_region r = {.slot = 0, .flags = KVM_MEM_LOG_DIRTY_PAGES,
                                            .guest_phys_addr = 0, .memory_size = v->memsz,
                                            .userspace_addr = (uint64_t)v->mem};
    if (ioctl(v->vm, KVM_SET_USER_MEMORY_REGION, &r) < 0) DIE("KVM_SET_USER_MEMORY_REGION");
    d->words = (v->memsz / 4096 + 63) / 64;
    d->bitmap = calloc(d->words, 8);
    d->clean = mmap(NULL, v->memsz, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (!d->bitmap || d->clean == MAP_FAILED) DIE("allocate the clean copy");
    memcpy(d->clean, v->mem, GUEST_MEM);
    d->log = (struct kvm_dirty_log){.slot = 0, .dirty_bitmap = d->bitmap};
    if (ioctl(v->vm, KVM_GET_DIRTY_LOG, &d->log) < 0) DIE("KVM_GET_DIRTY_LOG");
}

/* Runs from `regs` (through kvm_run's sync area, no ioctl) to the OUT to the exit port. */
static void run_from(vcpu_t *c, const struct kvm_regs *regs) {
    c->run->s.regs.regs = *regs;
    c->run->kvm_dirty_regs = KVM_SYNC_X86_REGS;
    int e = kvm_run(c);
    if (e != KVM_EXIT_IO || c->run->io.port != PORT_EXIT) {
        errno = 0;
        DIE("unexpected exit %d", e);
    }
}

/* KVM_GET_DIRTY_LOG, then the dirty pages copied back; returns how many. */
static uint64_t dirty_restore(vm_t *v, dirty_t *d) {
    uint64_t copied = 0;
    if (ioctl(v->vm, KVM_GET_DIRTY_LOG, &d->log) < 0) DIE("KVM_GET_DIRTY_LOG");
    for (size_t w = 0; w < d->words; w++) {
        uint64_t bits = d->bitmap[w];
        while (bits) {
            size_t p = w * 64 + (size_t)__builtin_ctzll(bits);
            memcpy(v->mem + p * 4096, d->clean + p * 4096, 4096);
            bits &= bits - 1;
            copied++;
        }
    }
    return copied;
}

static void dirty_stop(vm_t *v, dirty_t *d) {
    munmap(d->clean, v->memsz);
    free(d->bitmap);
}

/* Tables, a vCPU in 64-bit user mode, dirty logging from the guest memory as it is now
 * (the "snapshot"), its registers in `regs`, and KVM mirroring them in kvm_run. */
static void start_from_snapshot(vm_t *v, vcpu_t *c, dirty_t *d, struct kvm_regs *regs) {
    write_tables(v);
    vcpu_create(v, c, 0);
    setup_long(c, 0);
    dirty_start(v, d);
    if (ioctl(c->fd, KVM_GET_REGS, regs) < 0) DIE("KVM_GET_REGS");
    c->run->kvm_valid_regs = KVM_SYNC_X86_REGS;
}

/* The fuzzing-style reset floor: what a snapshot restore must do at the least. */
static void mode_reset(const char *bin, uint64_t mib) {
    vm_t v;
    vcpu_t c;
    if (mib < 2 || mib > (1u << 20)) {
        errno = EINVAL;
        DIE("bad memory size %llu MiB", (unsigned long long)mib);
    }
    vm_create(&v, (size_t)mib << 20);
    load_guest(&v, bin);
    dirty_t d;
    struct kvm_regs regs;
    start_from_snapshot(&v, &c, &d, &regs);
    struct kvm_xsave xsave;
    if (ioctl(c.fd, KVM_GET_XSAVE, &xsave) < 0) DIE("KVM_GET_XSAVE");
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        unsigned long long n, k, fpu, copied = 0;
        if (sscanf(line, "%llu %llu %llu", &n, &k, &fpu) != 3) {
            errno = EINVAL;
            DIE("expected 'N K F'");
        }
        regs.rdi = n;
        regs.rsi = 0x100;
        double t0 = now();
        for (uint64_t i = 0; i < k; i++) {
            run_from(&c, &regs);
            copied += dirty_restore(&v, &d);
            if (fpu && ioctl(c.fd, KVM_SET_XSAVE, &xsave) < 0) DIE("KVM_SET_XSAVE");
        }
        double dt = now() - t0;
        if (copied < n * k) {
            errno = 0;
            DIE("copied %llu pages, expected at least %llu", copied, n * k);
        }
        printf("{\"mode\": \"reset\", \"n\": %llu, \"k\": %llu, \"fpu\": %llu, "
               "\"pages\": %llu, \"seconds\": %.9f}\n",
               n, k, fpu, copied, dt);
        fflush(stdout);
    }
    dirty_stop(&v, &d);
    vcpu_destroy(&c);
    vm_destroy(&v);
}

/* The fuzz-execution floor: restore, write the input and run, nothing else. */
#define FUZZ_IMAGE 0x100000u
#define FUZZ_RET 0x1f0000u      /* out 0xf4, al */
#define FUZZ_STACK 0x1e0000u    /* grows down */
#define FUZZ_INPUT_END 0x1f8000u

static void mode_fuzz(const char *image, uint64_t entry) {
    vm_t v;
    vcpu_t c;
    vm_create(&v, GUEST_MEM);
    FILE *f = fopen(image, "rb");
    if (!f) DIE("open %s", image);
    size_t got = fread(v.mem + FUZZ_IMAGE, 1, FUZZ_RET - FUZZ_IMAGE, f);
    fclose(f);
    if (got == 0) DIE("empty image %s", image);
    v.mem[FUZZ_RET] = 0xe6;
    v.mem[FUZZ_RET + 1] = PORT_EXIT;
    memcpy(v.mem + FUZZ_STACK - 8, &(uint64_t){FUZZ_RET}, 8);
    dirty_t d;
    struct kvm_regs regs;
    start_from_snapshot(&v, &c, &d, &regs);
    static char line[1 << 16];
    uint8_t input[(sizeof line) / 2];
    while (fgets(line, sizeof line, stdin)) {
        char *space = strchr(line, ' ');
        if (!space) {
            errno = EINVAL;
            DIE("expected 'HEXINPUT K'");
        }
        size_t len = (size_t)(space - line) / 2;
        for (size_t i = 0; i < len; i++) {
            unsigned byte;
            if (sscanf(line + 2 * i, "%2x", &byte) != 1) {
                errno = EINVAL;
                DIE("bad hex input");
            }
            input[i] = (uint8_t)byte;
        }
        unsigned long long k = strtoull(space + 1, NULL, 10), copied = 0;
        regs.rip = entry;
        regs.rdi = FUZZ_INPUT_END - len;
        regs.rsi = len;
        regs.rsp = FUZZ_STACK - 8;
        regs.rflags = 0x3002;
        double t0 = now();
        for (uint64_t i = 0; i < k; i++) {
            memcpy(v.mem + FUZZ_INPUT_END - len, input, len);
            run_from(&c, &regs);
            copied += dirty_restore(&v, &d);
        }
        double dt = now() - t0;
        printf("{\"mode\": \"fuzz\", \"len\": %zu, \"k\": %llu, \"pages\": %llu, "
               "\"seconds\": %.9f}\n", len, k, copied, dt);
        fflush(stdout);
    }
    dirty_stop(&v, &d);
    vcpu_destroy(&c);
    vm_destroy(&v);
}

typedef struct {
    vcpu_t c;
    pthread_barrier_t *start;
    loop_result_t R;
    double t_start, t_end;
} thread_arg_t;

static void *multi_thread(void *p) {
    thread_arg_t *a = p;
    pthread_barrier_wait(a->start);
    a->t_start = now();
    a->R = run_loop(&a->c);
    a->t_end = now();
    return NULL;
}

static void mode_multi(const char *bin, uint64_t n, int threads) {
    if (threads < 1 || threads > 64) {
        errno = EINVAL;
        DIE("bad thread count %d", threads);
    }
    vm_t v;
    vm_create(&v, GUEST_MEM);
    load_guest(&v, bin);
    write_tables(&v);
    thread_arg_t args[64];
    pthread_t tids[64];
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, (unsigned)threads);
    for (int i = 0; i < threads; i++) {
        vcpu_create(&v, &args[i].c, i);
        setup_long(&args[i].c, n);
        args[i].start = &start;
    }
    for (int i = 0; i < threads; i++)
        if (pthread_create(&tids[i], NULL, multi_thread, &args[i])) DIE("pthread_create");
    uint64_t exits = 0;
    double t0 = 0, t1 = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(tids[i], NULL);
        exits += args[i].R.exits;
        if (i == 0 || args[i].t_start < t0) t0 = args[i].t_start;
        if (args[i].t_end > t1) t1 = args[i].t_end;
    }
    printf("{\"mode\": \"multi\", \"n\": %llu, \"threads\": %d, \"exits\": %llu, "
           "\"seconds\": %.9f}\n",
           (unsigned long long)n, threads, (unsigned long long)exits, t1 - t0);
    for (int i = 0; i < threads; i++) vcpu_destroy(&args[i].c);
    vm_destroy(&v);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: raw_kvm compute GUEST.bin N | native|regs N | create N [MAPS] | "
                        "multi GUEST.bin N THREADS | serve GUEST.bin | reset GUEST.bin MIB | "
                        "fuzz IMAGE.bin ENTRY\n");
        return 2;
    }
    const char *mode = argv[1];
    if (!strcmp(mode, "native")) {
        mode_native(parse_u64(argv[2]));
        return 0;
    }
    open_kvm();
    if (!strcmp(mode, "compute") && argc == 4) mode_compute(argv[2], parse_u64(argv[3]));
    else if (!strcmp(mode, "create") && (argc == 3 || argc == 4))
        mode_create(parse_u64(argv[2]), argc == 4 ? parse_u64(argv[3]) : 0);
    else if (!strcmp(mode, "regs") && argc == 3) mode_regs(parse_u64(argv[2]));
    else if (!strcmp(mode, "serve") && argc == 3) mode_serve(argv[2]);
    else if (!strcmp(mode, "reset") && argc == 4) mode_reset(argv[2], parse_u64(argv[3]));
    else if (!strcmp(mode, "fuzz") && argc == 4) mode_fuzz(argv[2], parse_u64(argv[3]));
    else if (!strcmp(mode, "multi") && argc == 5)
        mode_multi(argv[2], parse_u64(argv[3]), (int)parse_u64(argv[4]));
    else {
        fprintf(stderr, "raw_kvm: bad arguments for mode '%s'\n", mode);
        return 2;
    }
    return 0;
}

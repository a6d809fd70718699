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
 *
 * The guest setup is kvmpy's `setup_long_mode(user=True)`: GDT at 0x1000, TSS with a full
 * I/O permission bitmap at 0x2000, PML4/PDPT/PD at 0x5000/0x6000/0x7000 identity-mapping
 * 1 GiB with 2 MiB pages, CPL3 64-bit code and data segments, IOPL=3.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define LOAD_ADDR 0x10000
#define GUEST_MEM (2u << 20)
#define GDT_ADDR 0x1000
#define TSS_ADDR 0x2000
#define TSS_SIZE (0x68 + 8192 + 1)
#define PML4_ADDR 0x5000
#define PDPT_ADDR 0x6000
#define PD_ADDR 0x7000
#define PORT_DEVICE 0x11
#define PORT_EXIT 0xF4
#define KVM_TSS_ADDRESS 0xfffbd000 /* what kvmpy passes to KVM_SET_TSS_ADDR */

#define DIE(...)                                                                        \
    do {                                                                                \
        fprintf(stderr, "raw_kvm: " __VA_ARGS__);                                       \
        fprintf(stderr, " (errno %d: %s)\n", errno, strerror(errno));                  \
        exit(2);                                                                        \
    } while (0)

static int kvm_fd;
static int run_size;
static struct kvm_cpuid2 *cpuid; /* fetched once per process, as kvmpy caches it */

typedef struct {
    int vm;
    uint8_t *mem;
    size_t memsz;
} vm_t;

typedef struct {
    int fd;
    struct kvm_run *run;
} vcpu_t;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void open_kvm(void) {
    kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm_fd < 0) DIE("open /dev/kvm");
    run_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size <= 0) DIE("KVM_GET_VCPU_MMAP_SIZE");
    int nent = 256;
    cpuid = calloc(1, sizeof(*cpuid) + nent * sizeof(struct kvm_cpuid_entry2));
    if (!cpuid) DIE("calloc");
    cpuid->nent = nent;
    if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) DIE("KVM_GET_SUPPORTED_CPUID");
}

static void vm_create(vm_t *v, size_t memsz) {
    v->vm = ioctl(kvm_fd, KVM_CREATE_VM, 0);
    if (v->vm < 0) DIE("KVM_CREATE_VM");
    if (ioctl(v->vm, KVM_SET_TSS_ADDR, KVM_TSS_ADDRESS) < 0) DIE("KVM_SET_TSS_ADDR");
    v->memsz = memsz;
    v->mem = mmap(NULL, memsz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                  -1, 0);
    if (v->mem == MAP_FAILED) DIE("mmap guest memory");
    struct kvm_userspace_memory_region r = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = memsz, .userspace_addr = (uint64_t)v->mem};
    if (ioctl(v->vm, KVM_SET_USER_MEMORY_REGION, &r) < 0) DIE("KVM_SET_USER_MEMORY_REGION");
}

static void vm_destroy(vm_t *v) {
    close(v->vm);
    munmap(v->mem, v->memsz);
}

static void vcpu_create(vm_t *v, vcpu_t *c, int id) {
    c->fd = ioctl(v->vm, KVM_CREATE_VCPU, id);
    if (c->fd < 0) DIE("KVM_CREATE_VCPU");
    c->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, c->fd, 0);
    if (c->run == MAP_FAILED) DIE("mmap kvm_run");
    for (uint32_t i = 0; i < cpuid->nent; i++) { /* kvmpy's per-vCPU CPUID tweaks */
        struct kvm_cpuid_entry2 *e = &cpuid->entries[i];
        if (e->function == 1) {
            e->ebx = (e->ebx & 0x00ffffff) | ((uint32_t)(id & 0xff) << 24);
            e->ecx |= 1u << 31;
        } else if (e->function == 0xb || e->function == 0x1f) {
            e->edx = (uint32_t)id;
        }
    }
    if (ioctl(c->fd, KVM_SET_CPUID2, cpuid) < 0) DIE("KVM_SET_CPUID2");
}

static void vcpu_destroy(vcpu_t *c) {
    munmap(c->run, run_size);
    close(c->fd);
}

static void load_guest(vm_t *v, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) DIE("open %s", path);
    size_t n = fread(v->mem + LOAD_ADDR, 1, v->memsz - LOAD_ADDR, f);
    fclose(f);
    if (n == 0) DIE("empty guest %s", path);
}

/* GDT, TSS and page tables in guest memory (once per VM). */
static void write_tables(vm_t *v) {
    uint64_t *pml4 = (uint64_t *)(v->mem + PML4_ADDR);
    uint64_t *pdpt = (uint64_t *)(v->mem + PDPT_ADDR);
    uint64_t *pd = (uint64_t *)(v->mem + PD_ADDR);
    pml4[0] = PDPT_ADDR | 7; /* present, writable, user */
    pdpt[0] = PD_ADDR | 7;
    for (uint64_t i = 0; i < 512; i++) pd[i] = (i << 21) | 0x87; /* + 2 MiB page */
    uint64_t lim = TSS_SIZE - 1;
    uint64_t gdt[7] = {
        0,
        0x00af9b000000ffffULL, /* 0x08 code64 DPL0 */
        0x00cf93000000ffffULL, /* 0x10 data DPL0 */
        0x00affb000000ffffULL, /* 0x18 code64 DPL3 */
        0x00cff3000000ffffULL, /* 0x20 data DPL3 */
        (lim & 0xffff) | ((lim >> 16) << 48) | ((uint64_t)(TSS_ADDR & 0xffffff) << 16) |
            (0x8bULL << 40) | ((uint64_t)(TSS_ADDR >> 24) << 56), /* 0x28 busy TSS */
        0};
    memcpy(v->mem + GDT_ADDR, gdt, sizeof gdt);
    memset(v->mem + TSS_ADDR, 0, TSS_SIZE);
    *(uint16_t *)(v->mem + TSS_ADDR + 0x66) = 0x68; /* I/O bitmap right after the TSS */
    v->mem[TSS_ADDR + TSS_SIZE - 1] = 0xff;
}

static void setup_long(vcpu_t *c, uint64_t rdi) {
    struct kvm_sregs s;
    if (ioctl(c->fd, KVM_GET_SREGS, &s) < 0) DIE("KVM_GET_SREGS");
    struct kvm_segment cs = {.base = 0, .limit = 0xffffffff, .selector = 0x1b, .type = 0xb,
                             .present = 1, .dpl = 3, .db = 0, .s = 1, .l = 1, .g = 1};
    struct kvm_segment ds = {.base = 0, .limit = 0xffffffff, .selector = 0x23, .type = 0x3,
                             .present = 1, .dpl = 3, .db = 1, .s = 1, .l = 0, .g = 1};
    s.cs = cs;
    s.ds = s.es = s.fs = s.gs = s.ss = ds;
    s.tr = (struct kvm_segment){.base = TSS_ADDR, .limit = TSS_SIZE - 1, .selector = 0x28,
                                .type = 0xb, .present = 1};
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = 7 * 8 - 1;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = 0x80050033;
    s.cr3 = PML4_ADDR;
    s.cr4 = 0x620;
    s.efer = 0xd01;
    if (ioctl(c->fd, KVM_SET_SREGS, &s) < 0) DIE("KVM_SET_SREGS");
    struct kvm_regs r = {.rip = LOAD_ADDR, .rdi = rdi, .rflags = 0x3002};
    if (ioctl(c->fd, KVM_SET_REGS, &r) < 0) DIE("KVM_SET_REGS");
}

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

/* One VM with the guest `bin` loaded and one vCPU in 64-bit user mode with RDI = rdi. */
static void boot_one(vm_t *v, vcpu_t *c, const char *bin, uint64_t rdi) {
    vm_create(v, GUEST_MEM);
    load_guest(v, bin);
    write_tables(v);
    vcpu_create(v, c, 0);
    setup_long(c, rdi);
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
                        "multi GUEST.bin N THREADS | serve GUEST.bin\n");
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
    else if (!strcmp(mode, "multi") && argc == 5)
        mode_multi(argv[2], parse_u64(argv[3]), (int)parse_u64(argv[4]));
    else {
        fprintf(stderr, "raw_kvm: bad arguments for mode '%s'\n", mode);
        return 2;
    }
    return 0;
}

/* raw_kvm.h - the KVM setup shared by the C baselines (raw_kvm.c, cext_exit.c).
 *
 * Opening /dev/kvm, VM and vCPU creation (KVM_SET_TSS_ADDR, one memory slot, CPUID as
 * kvmpy sets it), loading a flat guest, and kvmpy's `setup_long_mode(user=True)`: GDT at
 * 0x1000, TSS with a full I/O permission bitmap at 0x2000, PML4/PDPT/PD at
 * 0x5000/0x6000/0x7000 identity-mapping 1 GiB with 2 MiB pages, CPL3 64-bit code and data
 * segments, IOPL=3.
 *
 * Every function is static: each program includes this header once. Errors go through
 * DIE(fmt, ...), which prints and exits unless the includer defines its own DIE first.
 */
#ifndef RAW_KVM_H
#define RAW_KVM_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
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

#ifndef DIE
#define DIE(...)                                                                        \
    do {                                                                                \
        fprintf(stderr, "raw_kvm: " __VA_ARGS__);                                       \
        fprintf(stderr, " (errno %d: %s)\n", errno, strerror(errno));                  \
        exit(2);                                                                        \
    } while (0)
#endif

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

/* One VM with the guest `bin` loaded and one vCPU in 64-bit user mode with RDI = rdi. */
static void boot_one(vm_t *v, vcpu_t *c, const char *bin, uint64_t rdi) {
    vm_create(v, GUEST_MEM);
    load_guest(v, bin);
    write_tables(v);
    vcpu_create(v, c, 0);
    setup_long(c, rdi);
}

#endif /* RAW_KVM_H */

// Threads and CPUs for the transport's workers (see CFuseTransport.h).
#include "CFuseTransport.h"
#include <errno.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

/* CPUs this process may run on (its affinity mask), at least 1. */
unsigned cfuse_affinity_cpu_count(void) {
    unsigned long mask[16] = {0};  /* 1024 CPUs */
    long n = syscall(SYS_sched_getaffinity, 0, sizeof mask, mask);
    unsigned count = 0;
    for (long i = 0; n > 0 && i < n / (long)sizeof mask[0]; i++) count += (unsigned)__builtin_popcountl(mask[i]);
    return count ? count : 1;
}

/* Whether this process may run on `cpu` (its affinity mask). */
int cfuse_affinity_has_cpu(unsigned cpu) {
    unsigned long mask[16] = {0};
    long n = syscall(SYS_sched_getaffinity, 0, sizeof mask, mask);
    if (n <= 0 || cpu >= (unsigned long)n * 8) return 0;
    return (mask[cpu / (8 * sizeof mask[0])] >> (cpu % (8 * sizeof mask[0]))) & 1;
}

/* Binds the calling thread to one CPU; 0 or -errno. */
int cfuse_bind_thread_to_cpu(unsigned cpu) {
    unsigned long mask[16] = {0};
    if (cpu >= sizeof mask * 8) return -EINVAL;
    mask[cpu / (8 * sizeof mask[0])] |= 1UL << (cpu % (8 * sizeof mask[0]));
    return syscall(SYS_sched_setaffinity, 0, sizeof mask, mask) == 0 ? 0 : -errno;
}

/* Names the calling thread (ps -L, /proc/PID/task/TID/comm); at most 15 characters. */
void cfuse_set_thread_name(const char *name) { (void)prctl(PR_SET_NAME, name, 0, 0, 0); }

// The worker pool that serves a FUSE session over /dev/fuse (see CFuseTransport.h).
#define FUSE_USE_VERSION 312
#include "CFuseTransport.h"
#include <fuse_lowlevel.h>
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* ---- The session's workers ----------------------------------------------------------------
   libfuse's own multi-threaded loop starts a worker whenever a request finds none idle and ends
   one as soon as more than max_idle are idle: an asynchronous RELEASE beside the next request
   then either creates and ends a thread per file, or grows a pool whose extra workers rotate
   cold stacks (the kernel wakes the longest-waiting reader). This pool keeps `base` workers and
   starts a rescue worker only when every worker has been busy without finishing anything for
   `stuck_ms` (a write waiting for a frozen cgroup's charge), up to `max`; a rescue worker ends
   once it finishes a request while another worker is idle. Workers may be cancelled only while
   they wait to receive, as in libfuse's loop (a handler may hold the file system's locks). */

struct cfuse_pool {
    struct fuse_session *se;
    unsigned base, max, stuck_ms;
    pthread_mutex_t lock;
    sem_t finished;            /* posted when a worker sees the session end */
    unsigned workers, idle;
    uint64_t progress_ns;      /* when a worker last finished a request or went idle */
    pthread_t threads[256];
    int done;
};

static uint64_t cfuse_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void *cfuse_pool_worker(void *arg);

/* ---- Request buffers, out of core dumps -------------------------------------------------------
   libfuse reads each request into buf->mem, malloc'ing it (se->bufsize) when it is NULL: a WRITE's
   payload then sits in the heap, and a crashed server's core holds the last request of every
   worker (issue 21: 64 small files' text, or a whole 2 MiB file, found in the core). So each
   worker hands libfuse a buffer of its own: mapped, MADV_DONTDUMP, with a PROT_NONE guard page
   after it (a request longer than the buffer fails the read with EFAULT instead of writing past
   it). Its size is libfuse 3.14's se->bufsize, FUSE_MAX_MAX_PAGES (256) pages plus
   FUSE_BUFFER_HEADER_SIZE (4096): libfuse passes that length to read(2), and the kernel writes at
   most one request (max_write, 1 MiB, plus its headers) into it. */

static size_t cfuse_request_buffer_size(void) {
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0) page = 4096;
    return 256u * (size_t)page + 4096u;
}

static size_t cfuse_request_mapping_size(void) {
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0) page = 4096;
    size_t p = (size_t)page;
    return (cfuse_request_buffer_size() + p - 1) / p * p + p;  /* rounded up, plus the guard */
}

/* With -o takeover a server may be killed in the middle of a request's copy, and the kernel
   fails a copy that faults while a fatal signal is pending (fuse_dev_do_read and _write: the
   caller gets EIO instead of a resend). Buffers written by the kernel are then mapped up front. */
static int prefault_buffers;

void cfuse_pool_prefault_buffers(int on) { prefault_buffers = on; }

/* NULL when the mapping fails (then libfuse mallocs its own, as before: served, but dumpable). */
static void *cfuse_request_buffer_new(void) {
    size_t total = cfuse_request_mapping_size();
    long page = sysconf(_SC_PAGESIZE);
    size_t guard = page > 0 ? (size_t)page : 4096u;
    void *mem = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) return NULL;
    if (madvise(mem, total, MADV_DONTDUMP) != 0 ||
        mprotect((char *)mem + total - guard, guard, PROT_NONE) != 0) {
        munmap(mem, total);
        return NULL;
    }
    if (prefault_buffers) (void)madvise(mem, total - guard, 23 /* MADV_POPULATE_WRITE, 5.14 */);
    return mem;
}

/* Frees what cfuse_request_buffer_new mapped, or what libfuse malloc'd in its place. */
static void cfuse_request_buffer_free(void *mem, int mapped) {
    if (mem == NULL) return;
    if (mapped) munmap(mem, cfuse_request_mapping_size()); else free(mem);
}

/* With pool->lock held. */
static int cfuse_pool_start(struct cfuse_pool *pool, int rescue) {
    if (pool->workers >= pool->max) return -1;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1u << 20);
    pthread_t t;
    int rc = pthread_create(&t, &attr, cfuse_pool_worker, (void *)((uintptr_t)pool | (uintptr_t)rescue));
    pthread_attr_destroy(&attr);
    if (rc != 0) return -1;
    if (rescue) pthread_detach(t); else pool->threads[pool->workers] = t;
    pool->workers++;
    pool->idle++;
    return 0;
}

static void *cfuse_pool_worker(void *arg) {
    int rescue = (int)((uintptr_t)arg & 1u);
    struct cfuse_pool *pool = (struct cfuse_pool *)((uintptr_t)arg & ~(uintptr_t)1u);
    struct fuse_buf buf;
    memset(&buf, 0, sizeof buf);
    buf.mem = cfuse_request_buffer_new();
    int mapped = buf.mem != NULL;
    pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, NULL);
    for (;;) {
        if (fuse_session_exited(pool->se)) break;
        pthread_setcancelstate(PTHREAD_CANCEL_ENABLE, NULL);
        int res = fuse_session_receive_buf(pool->se, &buf);
        pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, NULL);
        if (res == -EINTR) continue;
        if (res <= 0) break;  /* unmounted (ENODEV) or an error: the session ends */
        pthread_mutex_lock(&pool->lock);
        pool->idle--;
        pthread_mutex_unlock(&pool->lock);
        fuse_session_process_buf(pool->se, &buf);
        pthread_mutex_lock(&pool->lock);
        pool->progress_ns = cfuse_now_ns();
        int leave = rescue && pool->idle > 0;
        if (leave) pool->workers--; else pool->idle++;
        pthread_mutex_unlock(&pool->lock);
        if (leave) { cfuse_request_buffer_free(buf.mem, mapped); return NULL; }
    }
    cfuse_request_buffer_free(buf.mem, mapped);
    if (!fuse_session_exited(pool->se)) fuse_session_exit(pool->se);
    sem_post(&pool->finished);
    return NULL;
}

static void *cfuse_pool_watchdog(void *arg) {
    struct cfuse_pool *pool = arg;
    struct timespec tick = { 0, 20 * 1000000L };
    for (;;) {
        nanosleep(&tick, NULL);
        pthread_mutex_lock(&pool->lock);
        if (pool->done) { pthread_mutex_unlock(&pool->lock); return NULL; }
        /* A signal that landed here ended the session, and nobody else may have seen it. */
        if (fuse_session_exited(pool->se)) { pthread_mutex_unlock(&pool->lock); sem_post(&pool->finished); return NULL; }
        uint64_t now = cfuse_now_ns();
        if (pool->idle == 0 && now - pool->progress_ns > (uint64_t)pool->stuck_ms * 1000000u &&
            cfuse_pool_start(pool, 1) == 0) {
            pool->progress_ns = now;  /* give the new worker its chance before another */
        }
        pthread_mutex_unlock(&pool->lock);
    }
}

int cfuse_session_loop_pool(struct fuse_session *se, unsigned base, unsigned max, unsigned stuck_ms) {
    struct cfuse_pool *pool = calloc(1, sizeof *pool);
    if (pool == NULL) return -ENOMEM;
    pool->se = se;
    pool->base = base < 1 ? 1 : (base > 64 ? 64 : base);
    pool->max = max < pool->base ? pool->base : (max > 256 ? 256 : max);
    pool->stuck_ms = stuck_ms;
    pthread_mutex_init(&pool->lock, NULL);
    sem_init(&pool->finished, 0, 0);
    pool->progress_ns = cfuse_now_ns();
    int rc = 0;
    pthread_mutex_lock(&pool->lock);
    for (unsigned i = 0; i < pool->base; i++) if (cfuse_pool_start(pool, 0) != 0) { rc = -EAGAIN; break; }
    unsigned started = pool->workers;
    pthread_mutex_unlock(&pool->lock);
    pthread_t watchdog;
    int have_watchdog = rc == 0 && pool->max > pool->base && pthread_create(&watchdog, NULL, cfuse_pool_watchdog, pool) == 0;
    if (rc == 0) {
        /* A signal interrupts the wait: its handler has ended the session. */
        while (sem_wait(&pool->finished) != 0 && errno == EINTR && !fuse_session_exited(se)) {}
    } else {
        fuse_session_exit(se);
    }
    pthread_mutex_lock(&pool->lock);
    pool->done = 1;
    pthread_mutex_unlock(&pool->lock);
    if (have_watchdog) pthread_join(watchdog, NULL);
    /* Base workers still waiting to receive are cancelled there; rescue workers are detached and
       end on their own (the session is over). */
    for (unsigned i = 0; i < started; i++) pthread_cancel(pool->threads[i]);
    for (unsigned i = 0; i < started; i++) pthread_join(pool->threads[i], NULL);
    /* The pool is not freed: a rescue worker may still be finishing a request (or waiting to
       receive) and will touch it; the daemon exits right after this returns. */
    fuse_session_reset(se);
    return rc;
}

//! Keeps the process's heap to what the monitor holds: glibc's malloc, left
//! to itself, keeps the peak of every table refresh (a walk of every socket)
//! and of every thread that ever allocated, so a monitor's resident memory
//! only grows. Measured in docs/benchmarks.md §3.

/// Allocations from this size on get their own mapping, returned to the
/// kernel when freed. glibc raises its threshold (to 32 MiB) after the
/// first such block is freed, which moves every later walk's buffers into
/// the heap, where their peak stays; a fixed threshold keeps them out.
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;
/// One heap for the monitor, one for every other thread (the namespace
/// walkers, `top`'s and `serve`'s): each extra heap keeps its own peak.
#[cfg(target_env = "gnu")]
const ARENAS: libc::c_int = 2;

/// Sets the allocator up; call once, before the work starts.
pub fn configure() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

/// Returns freed heap pages to the kernel: after a table refresh, whose
/// transient allocations sit between live ones.
pub fn release() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

//! Shared memory mappings: a file mapped `MAP_SHARED`, or an anonymous
//! shared mapping inherited across fork, viewed as typed atomics.
//!
//! Why it is built this way: the shared-memory locks keep their state in
//! memory that several processes map at once. Everything about that memory
//! that needs `unsafe` lives here: creating and removing the mapping, and
//! handing out references to the atomics in it. A reference may only be made
//! to a type that is sound to overlay on memory another process writes
//! concurrently and that may hold any bit pattern (see [`Overlay`]), within
//! bounds and aligned; these checks are made at run time, so the callers are
//! safe code.
//!
//! References: mmap(2), munmap(2), fstatfs(2).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

/// Types that may be viewed in place in a shared mapping.
///
/// # Safety
///
/// Implementors must be `repr(C)` (or primitive), be valid for every bit
/// pattern (including all zeroes, as a fresh mapping is), and be made only of
/// atomics (plus padding), so that concurrent access from other processes is
/// not a data race.
pub unsafe trait Overlay: Sync {}

// SAFETY: an atomic integer is valid for any bit pattern and is accessed
// only atomically.
unsafe impl Overlay for AtomicU32 {}
// SAFETY: as above.
unsafe impl Overlay for AtomicU64 {}
// SAFETY: `Words` is repr(C) and made only of atomics (see shm::layout).
#[cfg(not(loom))]
unsafe impl Overlay for crate::shm::layout::Words {}
// SAFETY: `Slot` is repr(C) and made only of atomics (see shm::layout).
#[cfg(not(loom))]
unsafe impl Overlay for crate::shm::layout::Slot {}

/// A read-write shared mapping, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory; the only references handed out are
// to `Overlay` types, which are `Sync` and accessed atomically.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn map(len: usize, flags: libc::c_int, fd: libc::c_int) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh mapping at an address of the kernel's choosing
        // (null hint) cannot overlap any Rust object; `fd` is either -1 with
        // MAP_ANONYMOUS or a descriptor the caller keeps open for the call.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping { ptr, len })
    }

    /// Maps the first `len` bytes of `file` shared and read-write. The
    /// caller must have checked that the file is at least `len` bytes long:
    /// touching a page past the end of the file raises SIGBUS.
    pub fn shared_file(file: &File, len: usize) -> io::Result<Mapping> {
        let size = file.metadata()?.len();
        if (size as u128) < len as u128 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Mapping::map(len, libc::MAP_SHARED, file.as_raw_fd())
    }

    /// A zero-filled anonymous mapping of `len` bytes that processes created
    /// by fork() share with this one.
    pub fn shared_anonymous(len: usize) -> io::Result<Mapping> {
        Mapping::map(len, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1)
    }

    /// Whether `[addr, addr + size)` lies inside the mapping.
    pub fn contains(&self, addr: usize, size: usize) -> bool {
        let base = self.ptr.as_ptr() as usize;
        addr >= base && addr.checked_add(size).is_some_and(|e| e <= base + self.len)
    }

    /// A reference to the `T` at `offset`; panics if it is out of bounds or
    /// misaligned (a bug in the caller's layout, not a run-time condition).
    pub fn get<T: Overlay>(&self, offset: usize) -> &T {
        &self.slice::<T>(offset, 1)[0]
    }

    /// A reference to `n` consecutive `T`s starting at `offset`; panics if
    /// out of bounds or misaligned.
    pub fn slice<T: Overlay>(&self, offset: usize, n: usize) -> &[T] {
        let size = std::mem::size_of::<T>()
            .checked_mul(n)
            .and_then(|b| b.checked_add(offset))
            .expect("mapping range overflows");
        assert!(size <= self.len, "mapping range out of bounds");
        let addr = self.ptr.as_ptr() as usize + offset;
        assert!(addr % std::mem::align_of::<T>() == 0, "misaligned overlay");
        // SAFETY: the range [offset, offset + n*size_of T) lies inside the
        // live mapping (checked above) and is aligned for T; T: Overlay is
        // valid for any bit pattern and accessed only atomically, so shared
        // references to it are sound even while other processes write it.
        // The slice borrows `self`, so it cannot outlive the mapping.
        unsafe { std::slice::from_raw_parts(addr as *const T, n) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and no
        // reference into the mapping outlives `self` (they borrow it).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// A mapping seen as one `W` and a table of `n` `S`s, checked once when
/// made, so the accessors on the hot path are plain pointer reads.
pub struct View<W, S> {
    /// Owns the memory the pointers below point into (unmapped on drop).
    map: std::sync::Arc<Mapping>,
    words: NonNull<W>,
    slots: NonNull<S>,
    n: usize,
}

// SAFETY: the view only hands out shared references to `Overlay` types,
// which are `Sync`; the mapping itself is Send + Sync (see above).
unsafe impl<W: Overlay, S: Overlay> Send for View<W, S> {}
// SAFETY: as above.
unsafe impl<W: Overlay, S: Overlay> Sync for View<W, S> {}

impl<W: Overlay, S: Overlay> View<W, S> {
    /// Views `map` with a `W` at `words_at` and `n` `S`s from `slots_at`;
    /// panics if they do not fit or are misaligned.
    pub fn new(map: Mapping, words_at: usize, slots_at: usize, n: usize) -> View<W, S> {
        let words = NonNull::from(map.get::<W>(words_at));
        let slots = NonNull::from(map.slice::<S>(slots_at, n)).cast::<S>();
        View {
            map: std::sync::Arc::new(map),
            words,
            slots,
            n,
        }
    }

    /// The mapping (shared: a robust-list entry in it keeps it mapped).
    pub fn mapping(&self) -> &std::sync::Arc<Mapping> {
        &self.map
    }

    /// The words.
    #[inline]
    pub fn words(&self) -> &W {
        // SAFETY: checked in `new` to lie in bounds and aligned inside
        // `self.map`, which lives as long as `self`; W: Overlay.
        unsafe { self.words.as_ref() }
    }

    /// The table.
    #[inline]
    pub fn slots(&self) -> &[S] {
        // SAFETY: as for `words`: `n` elements checked in `new`.
        unsafe { std::slice::from_raw_parts(self.slots.as_ptr(), self.n) }
    }
}

/// The file system type (`f_type` of fstatfs(2)) of the file system `file`
/// lives on, e.g. `0x6969` for NFS.
pub fn fs_type(file: &File) -> io::Result<i64> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `file` is a live descriptor; `st` is a properly sized buffer
    // that fstatfs fills on success.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs returned 0, so it initialised the struct (and it was
    // zeroed before, so every byte is initialised anyway).
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // f_type is not i64 on every target
    Ok(st.f_type as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn anonymous_mapping_is_zeroed_and_bounded() {
        let m = Mapping::shared_anonymous(4096).unwrap();
        let w: &AtomicU32 = m.get(64);
        assert_eq!(w.load(Ordering::SeqCst), 0);
        w.store(7, Ordering::SeqCst);
        assert_eq!(m.slice::<AtomicU32>(64, 1)[0].load(Ordering::SeqCst), 7);
        assert!(std::panic::catch_unwind(|| {
            let _: &AtomicU64 = m.get(4096);
        })
        .is_err());
    }
}

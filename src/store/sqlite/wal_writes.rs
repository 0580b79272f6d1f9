//! The group connection's writes to the WAL: a few system calls a commit instead of two a page.
//!
//! SQLite writes each WAL frame with two `pwrite`s: its 24-byte header, then its page (the
//! unix VFS's `walWriteOneFrame`). A frame is 4,120 bytes, so the two writes cross three file
//! pages of the kernel's between them, and each write pays the file system's per-write work
//! (`ext4_da_write_begin`/`_end`, the inode lock, the syscall) again. The relay's commits are
//! many frames each (about three an event: docs/BENCHMARKS.md), and `pwrite64` was 9.6 % of the
//! relay's CPU in the embedded benchmark's throughput phase, more than all of SQLite's B-tree
//! work. Written as one buffer, the same frames cost about a tenth (a bare loop on this
//! machine: 1.8 µs a frame as SQLite writes them, 0.18 µs as one write of 40 frames).
//!
//! This is a VFS of its own, `syncrelay-wal`, built on the process's default unix VFS: every
//! file is the unix VFS's own object (its shared memory and locks the same every other
//! connection of the process and of other processes uses), the database file and the WAL
//! behind a thin wrapper and the others in place. For the WAL it keeps the writes that follow
//! one another in a buffer and writes them with one `pwrite` when anything else is asked of the
//! file (a sync, a read, its size, a truncation, a file control, a write elsewhere, closing
//! it), when the buffer is full ([`MAX_BUFFERED`]), and before the log's write lock is released.
//!
//! Why that is safe, in SQLite's own order of a commit (`walFrames`, SQLite 3.46):
//! 1. the frames are written (buffered here);
//! 2. with `synchronous = full`, the WAL is synced (`xSync`): the buffer is written first, then
//!    synced, and a failure of either fails the commit as before;
//! 3. only then is the new end of the log published in the shared-memory index, where other
//!    connections (the pool's readers, other processes, checkpoints) learn of the frames.
//!
//! So no other connection can be told of a frame that is not in the file, and a process killed
//! after step 2 loses nothing the commit promised. This holds only when every commit syncs the
//! WAL: with `synchronous = normal` SQLite publishes frames without a sync, so the store uses
//! this VFS only with `full` (`store::sqlite::open_group_connection`).
//!
//! Frames written and not committed — a transaction that spilled pages to the log before it was
//! rolled back — are beyond the published end of the log, where SQLite ignores them; the next
//! writer writes its own frames there. So they must reach the file before any other connection
//! may write: what is buffered is written before the connection lets go of the log's write lock
//! (`WAL_WRITE_LOCK`, taken and released through the database file's `xShmLock`, which is why
//! the database file is wrapped too). Written later, they would overwrite another connection's
//! committed frames (`a_rolled_back_spill_never_overwrites_another_connections_commit`). Within
//! the connection, a write at another offset first writes what is buffered, so the file always
//! receives the writes in the order SQLite made them.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr;
use std::sync::{Arc, Mutex, OnceLock};

use rusqlite::ffi;

/// The VFS's name, for `sqlite3_open_v2`.
pub(super) const NAME: &str = "syncrelay-wal";
const NAME_C: &CStr = c"syncrelay-wal";

/// Bytes buffered at most before they are written: the most the unix VFS writes in one call
/// (its `seekAndWriteFd` keeps the low 17 bits of a length: 128 KiB - 1). That is 31 frames of
/// 4 KiB pages; a larger commit is written in pieces of that size.
const MAX_BUFFERED: usize = 0x1ffff;

/// Register the VFS with SQLite (once a process; not as the default). Fails when SQLite has no
/// default VFS to build on.
pub(super) fn register() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| unsafe {
            // SAFETY: sqlite3_vfs_find and sqlite3_vfs_register are thread-safe (SQLite is built
            // threadsafe); the VFS is leaked, so it outlives every connection that uses it.
            if ffi::sqlite3_initialize() != ffi::SQLITE_OK {
                return Err("SQLite did not initialise".into());
            }
            let inner = ffi::sqlite3_vfs_find(ptr::null());
            if inner.is_null() {
                return Err("SQLite has no default VFS".into());
            }
            let vfs = Box::leak(Box::new(ffi::sqlite3_vfs {
                iVersion: (*inner).iVersion.min(3),
                szOsFile: (*inner)
                    .szOsFile
                    .max(std::mem::size_of::<WalFile>().max(std::mem::size_of::<DbFile>()) as c_int),
                mxPathname: (*inner).mxPathname,
                pNext: ptr::null_mut(),
                zName: NAME_C.as_ptr(),
                pAppData: inner.cast(),
                xOpen: Some(x_open),
                xDelete: Some(x_delete),
                xAccess: Some(x_access),
                xFullPathname: Some(x_full_pathname),
                xDlOpen: Some(x_dl_open),
                xDlError: Some(x_dl_error),
                xDlSym: Some(x_dl_sym),
                xDlClose: Some(x_dl_close),
                xRandomness: Some(x_randomness),
                xSleep: Some(x_sleep),
                xCurrentTime: Some(x_current_time),
                xGetLastError: Some(x_get_last_error),
                xCurrentTimeInt64: Some(x_current_time_int64),
                xSetSystemCall: Some(x_set_system_call),
                xGetSystemCall: Some(x_get_system_call),
                xNextSystemCall: Some(x_next_system_call),
            }));
            match ffi::sqlite3_vfs_register(vfs, 0) {
                ffi::SQLITE_OK => Ok(()),
                rc => Err(format!("registering the {NAME} VFS failed ({rc})")),
            }
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// The VFS this one is built on (the unix VFS), from this one's `pAppData`.
unsafe fn inner(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    (*vfs).pAppData.cast()
}

/// A WAL's writes not made yet, and the unix VFS's file they go to.
struct Pending {
    /// The unix VFS's file (allocated apart: its own layout).
    file: *mut ffi::sqlite3_file,
    /// Bytes to write at `at`, in one piece.
    bytes: Vec<u8>,
    at: i64,
}

// SAFETY: `file` is only used while the `Mutex` around this is held, and SQLite's unix files
// may be used from any thread (one call at a time, which the `Mutex` ensures).
unsafe impl Send for Pending {}

impl Pending {
    /// Write what is buffered (one `pwrite`). The buffer is emptied whatever the outcome: after
    /// a failure SQLite rolls the transaction back, and those frames are not part of the log.
    unsafe fn flush(&mut self) -> c_int {
        if self.bytes.is_empty() {
            return ffi::SQLITE_OK;
        }
        let rc = write_at(
            self.file,
            self.bytes.as_ptr().cast(),
            self.bytes.len() as c_int,
            self.at,
        );
        self.bytes.clear();
        rc
    }
}

/// The open WALs of this process's connections through this VFS, by file name: the database
/// file's wrapper writes its WAL's buffer before the log's write lock is released.
static OPEN_WALS: Mutex<Vec<OpenWal>> = Mutex::new(Vec::new());

/// A WAL's file name and its buffer.
type OpenWal = (Vec<u8>, Arc<Mutex<Pending>>);

/// Write the buffers of the WALs named `name` (at most one has anything: only the connection
/// holding the log's write lock writes frames).
fn flush_wals(name: &[u8]) {
    let open = OPEN_WALS.lock().unwrap_or_else(|p| p.into_inner());
    for (n, pending) in open.iter() {
        if n == name {
            // SAFETY: the pending file is open while it is listed (removed before it closes).
            // A failure here is of frames no commit holds (see the module's doc).
            unsafe { lock(pending).flush() };
        }
    }
}

fn lock(p: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// An open WAL: SQLite's file object (first, as SQLite requires) and its buffer.
#[repr(C)]
struct WalFile {
    base: ffi::sqlite3_file,
    pending: Arc<Mutex<Pending>>,
}

/// An open database file: SQLite's file object, the unix VFS's file, its WAL's name.
#[repr(C)]
struct DbFile {
    base: ffi::sqlite3_file,
    inner: *mut ffi::sqlite3_file,
    wal_name: Vec<u8>,
}

unsafe extern "C" fn x_open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let inner_vfs = inner(vfs);
    let Some(open) = (*inner_vfs).xOpen else {
        return ffi::SQLITE_CANTOPEN;
    };
    let wal = flags & ffi::SQLITE_OPEN_WAL != 0;
    if !wal && flags & ffi::SQLITE_OPEN_MAIN_DB == 0 || name.is_null() {
        // Journals, temporary files: the unix VFS's own, in place (SQLite calls its methods).
        return open(inner_vfs, name, file, flags, out_flags);
    }
    let size = (*inner_vfs).szOsFile;
    let inner_file = ffi::sqlite3_malloc(size).cast::<ffi::sqlite3_file>();
    if inner_file.is_null() {
        (*file).pMethods = ptr::null();
        return ffi::SQLITE_NOMEM;
    }
    ptr::write_bytes(inner_file.cast::<u8>(), 0, size as usize);
    let rc = open(inner_vfs, name, inner_file, flags, out_flags);
    if rc != ffi::SQLITE_OK {
        // SQLite closes a file whose open failed only when it has methods (the unix VFS leaves
        // none then); either way its memory is ours.
        close_inner(inner_file);
        (*file).pMethods = ptr::null();
        return rc;
    }
    let name = CStr::from_ptr(name).to_bytes().to_vec();
    if wal {
        let pending = Arc::new(Mutex::new(Pending {
            file: inner_file,
            bytes: Vec::new(),
            at: 0,
        }));
        OPEN_WALS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, pending.clone()));
        ptr::write(
            file.cast::<WalFile>(),
            WalFile {
                base: ffi::sqlite3_file { pMethods: &WAL_METHODS },
                pending,
            },
        );
    } else {
        // The pager names the WAL after the database file it opened: "<database>-wal".
        let mut wal_name = name;
        wal_name.extend_from_slice(b"-wal");
        ptr::write(
            file.cast::<DbFile>(),
            DbFile {
                base: ffi::sqlite3_file { pMethods: &DB_METHODS },
                inner: inner_file,
                wal_name,
            },
        );
    }
    ffi::SQLITE_OK
}

/// Close a unix file opened apart (if it was opened) and free its memory.
unsafe fn close_inner(f: *mut ffi::sqlite3_file) -> c_int {
    let mut rc = ffi::SQLITE_OK;
    if !(*f).pMethods.is_null() {
        if let Some(close) = (*(*f).pMethods).xClose {
            rc = close(f);
        }
    }
    ffi::sqlite3_free(f.cast());
    rc
}

/// An `sqlite3_io_methods` function that hands its call to the unix file through `$via`
/// (`flushed`: once the WAL's buffer is written; `direct`, `db_op`: as it is), or answers
/// `$none` when the unix file has no such method. With two names, the WAL's (through `$via`)
/// and the database file's (through `db_op`).
macro_rules! forward {
    ($wal:ident via $via:ident, $db:ident: $method:ident($($arg:ident: $ty:ty),*) -> $ret:ty, else $none:expr) => {
        forward!($wal via $via: $method($($arg: $ty),*) -> $ret, else $none);
        forward!($db via db_op: $method($($arg: $ty),*) -> $ret, else $none);
    };
    ($name:ident via $via:ident: $method:ident($($arg:ident: $ty:ty),*) -> $ret:ty, else $none:expr) => {
        unsafe extern "C" fn $name(f: *mut ffi::sqlite3_file, $($arg: $ty),*) -> $ret {
            $via(f, |i| methods(i).$method.map_or($none, |m| m(i, $($arg),*)))
        }
    };
}

// ---- the WAL: writes gathered, everything else first writes them, then goes to the unix file.

static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(wal_close),
    xRead: Some(wal_read),
    xWrite: Some(wal_write),
    xTruncate: Some(wal_truncate),
    xSync: Some(wal_sync),
    xFileSize: Some(wal_file_size),
    xLock: Some(wal_lock),
    xUnlock: Some(wal_unlock),
    xCheckReservedLock: Some(wal_check_reserved_lock),
    xFileControl: Some(wal_file_control),
    xSectorSize: Some(wal_sector_size),
    xDeviceCharacteristics: Some(wal_device_characteristics),
    xShmMap: Some(wal_shm_map),
    xShmLock: Some(wal_shm_lock),
    xShmBarrier: Some(wal_shm_barrier),
    xShmUnmap: Some(wal_shm_unmap),
    xFetch: Some(wal_fetch),
    xUnfetch: Some(wal_unfetch),
};

unsafe fn wal<'a>(f: *mut ffi::sqlite3_file) -> &'a WalFile {
    &*f.cast::<WalFile>()
}

/// The unix file's methods.
unsafe fn methods<'a>(f: *mut ffi::sqlite3_file) -> &'a ffi::sqlite3_io_methods {
    &*(*f).pMethods
}

/// Run `op` on the unix file once everything buffered is written (an error writing it is
/// returned instead).
unsafe fn flushed(f: *mut ffi::sqlite3_file, op: impl FnOnce(*mut ffi::sqlite3_file) -> c_int) -> c_int {
    let mut p = lock(&wal(f).pending);
    let rc = p.flush();
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    op(p.file)
}

/// Run `op` on the unix file as it is (nothing that reads or changes the file's bytes).
unsafe fn direct<R>(f: *mut ffi::sqlite3_file, op: impl FnOnce(*mut ffi::sqlite3_file) -> R) -> R {
    let file = lock(&wal(f).pending).file;
    op(file)
}

unsafe extern "C" fn wal_close(f: *mut ffi::sqlite3_file) -> c_int {
    let w = f.cast::<WalFile>();
    {
        let mut open = OPEN_WALS.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|(_, p)| !Arc::ptr_eq(p, &(*w).pending));
    }
    let (flushed, file) = {
        let mut p = lock(&(*w).pending);
        (p.flush(), p.file)
    };
    let rc = close_inner(file);
    ptr::drop_in_place(w);
    (*f).pMethods = ptr::null();
    if flushed != ffi::SQLITE_OK {
        flushed
    } else {
        rc
    }
}

unsafe extern "C" fn wal_write(f: *mut ffi::sqlite3_file, buf: *const c_void, amt: c_int, off: i64) -> c_int {
    let mut p = lock(&wal(f).pending);
    let amt_u = amt.max(0) as usize;
    let follows = !p.bytes.is_empty() && off == p.at + p.bytes.len() as i64;
    if !follows || p.bytes.len() + amt_u > MAX_BUFFERED {
        // Elsewhere in the file (the WAL's header, a frame overwritten, the log started over),
        // or the buffer is full: what is buffered goes first, so writes keep their order.
        let rc = p.flush();
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        if amt_u > MAX_BUFFERED {
            return write_at(p.file, buf, amt, off);
        }
        p.at = off;
    }
    p.bytes
        .extend_from_slice(std::slice::from_raw_parts(buf.cast::<u8>(), amt_u));
    ffi::SQLITE_OK
}

// The WAL's reads, sizes, syncs, truncations and file controls see every write made so far;
// the rest (locks, shared memory, the device's properties) do not touch the file's bytes. The
// database file's go to the unix file as they are, but for `xShmLock` (below).
forward!(wal_read via flushed, db_read: xRead(buf: *mut c_void, amt: c_int, off: i64) -> c_int, else ffi::SQLITE_IOERR_READ);
forward!(wal_truncate via flushed, db_truncate: xTruncate(size: i64) -> c_int, else ffi::SQLITE_IOERR_TRUNCATE);
forward!(wal_sync via flushed, db_sync: xSync(flags: c_int) -> c_int, else ffi::SQLITE_IOERR_FSYNC);
forward!(wal_file_size via flushed, db_file_size: xFileSize(size: *mut i64) -> c_int, else ffi::SQLITE_IOERR_FSTAT);
forward!(wal_file_control via flushed, db_file_control: xFileControl(op: c_int, arg: *mut c_void) -> c_int, else ffi::SQLITE_NOTFOUND);
forward!(wal_lock via direct, db_lock: xLock(level: c_int) -> c_int, else ffi::SQLITE_OK);
forward!(wal_unlock via direct, db_unlock: xUnlock(level: c_int) -> c_int, else ffi::SQLITE_OK);
forward!(wal_check_reserved_lock via direct, db_check_reserved_lock: xCheckReservedLock(out: *mut c_int) -> c_int, else ffi::SQLITE_OK);
forward!(wal_sector_size via direct, db_sector_size: xSectorSize() -> c_int, else 4096);
forward!(wal_device_characteristics via direct, db_device_characteristics: xDeviceCharacteristics() -> c_int, else 0);
forward!(wal_shm_map via direct, db_shm_map: xShmMap(region: c_int, size: c_int, extend: c_int, out: *mut *mut c_void) -> c_int, else ffi::SQLITE_IOERR_SHMMAP);
forward!(wal_shm_lock via direct: xShmLock(offset: c_int, n: c_int, flags: c_int) -> c_int, else ffi::SQLITE_IOERR_SHMLOCK);
forward!(wal_shm_barrier via direct, db_shm_barrier: xShmBarrier() -> (), else ());
forward!(wal_shm_unmap via direct, db_shm_unmap: xShmUnmap(delete: c_int) -> c_int, else ffi::SQLITE_OK);
forward!(wal_unfetch via direct, db_unfetch: xUnfetch(off: i64, p: *mut c_void) -> c_int, else ffi::SQLITE_OK);

unsafe extern "C" fn wal_fetch(f: *mut ffi::sqlite3_file, off: i64, amt: c_int, out: *mut *mut c_void) -> c_int {
    flushed(f, |i| fetch(i, off, amt, out))
}

/// The unix file's memory map of a range, or none (SQLite then reads) when it has no `xFetch`.
unsafe fn fetch(i: *mut ffi::sqlite3_file, off: i64, amt: c_int, out: *mut *mut c_void) -> c_int {
    match methods(i).xFetch {
        Some(x) => x(i, off, amt, out),
        None => {
            *out = ptr::null_mut();
            ffi::SQLITE_OK
        }
    }
}

// ---- the database file: the unix file's, but its WAL's buffer is written before the log's
// write lock is let go.

/// `WAL_WRITE_LOCK` (SQLite's wal.c): the first lock of the shared memory's, held by the one
/// connection writing the log.
const WAL_WRITE_LOCK: c_int = 0;

static DB_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(db_close),
    xRead: Some(db_read),
    xWrite: Some(db_write),
    xTruncate: Some(db_truncate),
    xSync: Some(db_sync),
    xFileSize: Some(db_file_size),
    xLock: Some(db_lock),
    xUnlock: Some(db_unlock),
    xCheckReservedLock: Some(db_check_reserved_lock),
    xFileControl: Some(db_file_control),
    xSectorSize: Some(db_sector_size),
    xDeviceCharacteristics: Some(db_device_characteristics),
    xShmMap: Some(db_shm_map),
    xShmLock: Some(db_shm_lock),
    xShmBarrier: Some(db_shm_barrier),
    xShmUnmap: Some(db_shm_unmap),
    xFetch: Some(db_fetch),
    xUnfetch: Some(db_unfetch),
};

unsafe fn db<'a>(f: *mut ffi::sqlite3_file) -> &'a DbFile {
    &*f.cast::<DbFile>()
}

/// Run `op` on the unix file.
unsafe fn db_op<R>(f: *mut ffi::sqlite3_file, op: impl FnOnce(*mut ffi::sqlite3_file) -> R) -> R {
    op(db(f).inner)
}

unsafe extern "C" fn db_shm_lock(f: *mut ffi::sqlite3_file, offset: c_int, n: c_int, flags: c_int) -> c_int {
    if flags & ffi::SQLITE_SHM_UNLOCK != 0 && offset <= WAL_WRITE_LOCK && WAL_WRITE_LOCK < offset + n {
        // Letting go of the log: every frame this connection wrote is in the file first (see
        // the module's doc), so the next writer's frames can never be overwritten by them.
        flush_wals(&db(f).wal_name);
    }
    db_op(f, |i| {
        methods(i)
            .xShmLock
            .map_or(ffi::SQLITE_IOERR_SHMLOCK, |s| s(i, offset, n, flags))
    })
}

unsafe extern "C" fn db_close(f: *mut ffi::sqlite3_file) -> c_int {
    let rc = close_inner(db(f).inner);
    ptr::drop_in_place(f.cast::<DbFile>());
    (*f).pMethods = ptr::null();
    rc
}

unsafe extern "C" fn db_write(f: *mut ffi::sqlite3_file, buf: *const c_void, amt: c_int, off: i64) -> c_int {
    db_op(f, |i| write_at(i, buf, amt, off))
}

/// A write to the unix file, as it is.
unsafe fn write_at(i: *mut ffi::sqlite3_file, buf: *const c_void, amt: c_int, off: i64) -> c_int {
    methods(i)
        .xWrite
        .map_or(ffi::SQLITE_IOERR_WRITE, |w| w(i, buf, amt, off))
}

unsafe extern "C" fn db_fetch(f: *mut ffi::sqlite3_file, off: i64, amt: c_int, out: *mut *mut c_void) -> c_int {
    db_op(f, |i| fetch(i, off, amt, out))
}

// The rest of the VFS is the unix VFS's, called with its own object (its functions read their
// VFS's `pAppData`).

unsafe extern "C" fn x_delete(vfs: *mut ffi::sqlite3_vfs, name: *const c_char, sync_dir: c_int) -> c_int {
    let i = inner(vfs);
    (*i).xDelete.map_or(ffi::SQLITE_IOERR_DELETE, |x| x(i, name, sync_dir))
}

unsafe extern "C" fn x_access(vfs: *mut ffi::sqlite3_vfs, name: *const c_char, flags: c_int, out: *mut c_int) -> c_int {
    let i = inner(vfs);
    (*i).xAccess
        .map_or(ffi::SQLITE_IOERR_ACCESS, |x| x(i, name, flags, out))
}

unsafe extern "C" fn x_full_pathname(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    let i = inner(vfs);
    (*i).xFullPathname.map_or(ffi::SQLITE_CANTOPEN, |x| x(i, name, n, out))
}

unsafe extern "C" fn x_dl_open(vfs: *mut ffi::sqlite3_vfs, name: *const c_char) -> *mut c_void {
    let i = inner(vfs);
    (*i).xDlOpen.map_or(ptr::null_mut(), |x| x(i, name))
}

unsafe extern "C" fn x_dl_error(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) {
    let i = inner(vfs);
    if let Some(x) = (*i).xDlError {
        x(i, n, out)
    }
}

unsafe extern "C" fn x_dl_sym(
    vfs: *mut ffi::sqlite3_vfs,
    handle: *mut c_void,
    sym: *const c_char,
) -> Option<unsafe extern "C" fn(*mut ffi::sqlite3_vfs, *mut c_void, *const c_char)> {
    let i = inner(vfs);
    (*i).xDlSym.and_then(|x| x(i, handle, sym))
}

unsafe extern "C" fn x_dl_close(vfs: *mut ffi::sqlite3_vfs, handle: *mut c_void) {
    let i = inner(vfs);
    if let Some(x) = (*i).xDlClose {
        x(i, handle)
    }
}

unsafe extern "C" fn x_randomness(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    let i = inner(vfs);
    (*i).xRandomness.map_or(0, |x| x(i, n, out))
}

unsafe extern "C" fn x_sleep(vfs: *mut ffi::sqlite3_vfs, micros: c_int) -> c_int {
    let i = inner(vfs);
    (*i).xSleep.map_or(0, |x| x(i, micros))
}

unsafe extern "C" fn x_current_time(vfs: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    let i = inner(vfs);
    (*i).xCurrentTime.map_or(ffi::SQLITE_ERROR, |x| x(i, out))
}

unsafe extern "C" fn x_get_last_error(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    let i = inner(vfs);
    (*i).xGetLastError.map_or(0, |x| x(i, n, out))
}

unsafe extern "C" fn x_current_time_int64(vfs: *mut ffi::sqlite3_vfs, out: *mut i64) -> c_int {
    let i = inner(vfs);
    (*i).xCurrentTimeInt64.map_or(ffi::SQLITE_ERROR, |x| x(i, out))
}

unsafe extern "C" fn x_set_system_call(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    call: ffi::sqlite3_syscall_ptr,
) -> c_int {
    let i = inner(vfs);
    (*i).xSetSystemCall.map_or(ffi::SQLITE_NOTFOUND, |x| x(i, name, call))
}

unsafe extern "C" fn x_get_system_call(vfs: *mut ffi::sqlite3_vfs, name: *const c_char) -> ffi::sqlite3_syscall_ptr {
    let i = inner(vfs);
    (*i).xGetSystemCall.and_then(|x| x(i, name))
}

unsafe extern "C" fn x_next_system_call(vfs: *mut ffi::sqlite3_vfs, name: *const c_char) -> *const c_char {
    let i = inner(vfs);
    (*i).xNextSystemCall.map_or(ptr::null(), |x| x(i, name))
}

#[cfg(test)]
mod tests {
    use rusqlite::{Connection, OpenFlags};

    use super::*;

    /// A connection through this VFS, as the store opens its group connection.
    fn writer(path: &std::path::Path) -> Connection {
        register().unwrap();
        let c = Connection::open_with_flags_and_vfs(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            NAME,
        )
        .unwrap();
        c.pragma_update(None, "journal_mode", "wal").unwrap();
        c.pragma_update(None, "synchronous", "full").unwrap();
        c
    }

    /// Another connection on the unix VFS (the pool's readers, another process).
    fn reader(path: &std::path::Path) -> Connection {
        let c = Connection::open(path).unwrap();
        c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        c
    }

    fn sums(c: &Connection) -> (i64, i64) {
        c.query_row("SELECT COUNT(*), COALESCE(SUM(n), 0) FROM t", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap()
    }

    /// Every committed transaction is whole and at once visible to a connection that does not
    /// go through the buffer, while the writer commits transactions of every size: smaller than
    /// a frame, many frames, and larger than the buffer (written in pieces).
    #[test]
    fn other_connections_see_every_commit_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let w = writer(&path);
        w.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER NOT NULL, pad TEXT NOT NULL)")
            .unwrap();
        let r = reader(&path);
        let pad = "p".repeat(900);
        let (mut rows, mut total) = (0i64, 0i64);
        for (i, size) in [1, 3, 40, 200, 1, 700, 5, 2000, 2]
            .into_iter()
            .cycle()
            .take(60)
            .enumerate()
        {
            let tx = w.unchecked_transaction().unwrap();
            for k in 0..size {
                tx.execute("INSERT INTO t (n, pad) VALUES (?, ?)", rusqlite::params![k, pad])
                    .unwrap();
                total += k;
            }
            tx.commit().unwrap();
            rows += size;
            // Each commit is in the file for everyone as soon as it returns.
            assert_eq!(sums(&r), (rows, total), "after commit {i}");
        }
        assert_eq!(
            r.query_row("PRAGMA integrity_check", [], |x| x.get::<_, String>(0))
                .unwrap(),
            "ok"
        );
    }

    /// A transaction that spilled frames to the WAL (buffered here) and was rolled back leaves
    /// nothing behind once its connection lets go of the log: another connection's commit at the
    /// same place in the log (the sqlx writes' connection, another process) is never overwritten
    /// by those frames afterwards, whatever the first connection does next.
    #[test]
    fn a_rolled_back_spill_never_overwrites_another_connections_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let w = writer(&path);
        w.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER NOT NULL, pad TEXT NOT NULL)")
            .unwrap();
        // A page cache this small spills a page at a time once a transaction dirties more.
        w.pragma_update(None, "cache_size", 10).unwrap();
        let other = reader(&path);
        for round in 0..5i64 {
            // An empty log: whatever the rollback reads again comes from the database file.
            w.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
            let tx = w.unchecked_transaction().unwrap();
            for _ in 0..40 {
                tx.execute("INSERT INTO t (n, pad) VALUES (0, ?)", [&"s".repeat(2000)])
                    .unwrap();
            }
            tx.rollback().unwrap();
            // Another connection commits where the spilled frames were.
            other
                .execute(
                    "INSERT INTO t (n, pad) VALUES (?, ?)",
                    rusqlite::params![round + 1, "c".repeat(3000)],
                )
                .unwrap();
            // The first connection reads (the log, through its buffer) and writes again.
            assert_eq!(
                w.query_row("SELECT COUNT(*) FROM t", [], |r| r.get::<_, i64>(0))
                    .unwrap(),
                round + 1
            );
            w.execute("INSERT INTO t (n, pad) VALUES (0, 'w')", []).unwrap();
            w.execute("DELETE FROM t WHERE pad = 'w'", []).unwrap();
        }
        let r = reader(&path);
        assert_eq!(sums(&r), (5, 15));
        assert_eq!(
            r.query_row("PRAGMA integrity_check", [], |x| x.get::<_, String>(0))
                .unwrap(),
            "ok"
        );
        drop((w, other, r));
        assert_eq!(sums(&reader(&path)), (5, 15));
    }

    /// A rolled-back transaction's frames (some of them spilled to the WAL before the rollback)
    /// never count, the log still takes new commits after them and after starting over from a
    /// checkpoint, and the database reopened without this VFS has exactly what was committed.
    #[test]
    fn rollbacks_and_checkpoints_leave_exactly_the_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        {
            let w = writer(&path);
            // A small page cache makes a large transaction spill frames before its commit.
            w.pragma_update(None, "cache_size", 10).unwrap();
            w.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER NOT NULL, pad TEXT NOT NULL)")
                .unwrap();
            let pad = "q".repeat(1500);
            let write = |n: i64, rows: i64, commit: bool| {
                let tx = w.unchecked_transaction().unwrap();
                for _ in 0..rows {
                    tx.execute("INSERT INTO t (n, pad) VALUES (?, ?)", rusqlite::params![n, pad])
                        .unwrap();
                }
                if commit {
                    tx.commit().unwrap()
                } else {
                    tx.rollback().unwrap()
                }
            };
            write(1, 300, true);
            write(1000, 500, false);
            write(2, 10, true);
            w.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
            write(3, 50, true);
            write(1000, 400, false);
            w.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())).unwrap();
            write(4, 5, true);
            assert_eq!(sums(&reader(&path)), (365, 300 + 20 + 150 + 20));
        }
        // Reopened on the unix VFS alone: the WAL as this VFS left it is a valid log.
        let r = reader(&path);
        assert_eq!(sums(&r), (365, 300 + 20 + 150 + 20));
        assert_eq!(
            r.query_row("PRAGMA integrity_check", [], |x| x.get::<_, String>(0))
                .unwrap(),
            "ok"
        );
    }
}

//! The optimizer's own rayon pool, driven so that a step allocates nothing.
//!
//! `ThreadPool::install` from a thread outside the pool pushes onto rayon's injector queue,
//! which allocates a block every 63 jobs. Instead, one job that lives as long as the pool
//! (the dispatcher) waits on a condition variable for work and runs it *inside* the pool,
//! where rayon's fork-join uses stack-allocated jobs only. The caller hands over a closure
//! and sleeps until it is done: the pool's threads do the work, the caller's thread does not.
//!
//! The threads are spawned here (rayon's spawn handler), so that `Drop` can join them: after
//! `lion_destroy` no thread of ours is left running code from a library the host may unload
//! next. In a child of `fork()` the threads do not exist: a stale pool is never waited for
//! (its memory is left behind, not its threads joined), and `revive_after_fork` builds a new one.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::fork::Birth;
use crate::status::{Error, Result};

type Job = dyn Fn() + Sync;

enum Slot {
    Idle,
    /// A job borrowed from the caller of `run`, who waits until it is `Done`.
    Request(*const Job),
    Running,
    Done(Option<Box<dyn Any + Send>>),
    Exit,
}

// The raw job pointer only crosses to the dispatcher while its owner blocks in `run`.
unsafe impl Send for Slot {}

struct Shared {
    slot: Mutex<Slot>,
    changed: Condvar,
}

pub struct Pool {
    rayon: Option<rayon::ThreadPool>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    birth: Birth,
}

impl Pool {
    /// `threads` = 0 means one per hardware thread.
    pub fn new(threads: usize) -> Result<Pool> {
        // 0: one per hardware thread, decided here (rayon's own default would follow
        // RAYON_NUM_THREADS, a setting of the host's, not of this optimizer).
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let birth = Birth::now();
        let started = Arc::new((Mutex::new(0usize), Condvar::new()));
        let on_start = Arc::clone(&started);
        let spawned = Arc::new(Mutex::new(Vec::new()));
        let spawner = Arc::clone(&spawned);
        let built = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("lion-cpu-{i}"))
            .start_handler(move |_| {
                let mut n = on_start.0.lock().unwrap_or_else(|e| e.into_inner());
                *n += 1;
                on_start.1.notify_all();
            })
            .spawn_handler(move |thread| {
                let mut b = std::thread::Builder::new();
                if let Some(name) = thread.name() {
                    b = b.name(name.to_owned());
                }
                if let Some(size) = thread.stack_size() {
                    b = b.stack_size(size);
                }
                // The standard floating-point environment (`fp_env`), whatever the creating
                // thread's: these threads run nothing else.
                let handle = b.spawn(|| {
                    crate::fp_env::set_standard();
                    thread.run()
                })?;
                lock(&spawner).push(handle);
                Ok(())
            })
            .build();
        let mut handles = std::mem::take(&mut *lock(&spawned));
        let rayon = match built {
            Ok(rayon) => rayon,
            Err(e) => {
                // The threads that did start were handed no pool and exit at once.
                handles.drain(..).for_each(|h| drop(h.join()));
                return Err(Error::out_of_memory(format!(
                    "could not start the CPU thread pool of {threads} threads: {e}"
                )));
            }
        };
        // Wait for every thread to be up, so that no thread start-up (which allocates) runs
        // later, during a step.
        let n = rayon.current_num_threads();
        wait_until(&started, |running| running == n);
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot::Idle),
            changed: Condvar::new(),
        });
        let dispatcher = Arc::clone(&shared);
        rayon.spawn(move || dispatch(&dispatcher));
        Ok(Pool {
            rayon: Some(rayon),
            shared,
            threads: handles,
            birth,
        })
    }

    /// In a child of `fork()`, replaces this pool (whose threads exist only in the parent)
    /// by a new one of as many threads; elsewhere does nothing.
    pub fn revive_after_fork(&mut self) -> Result<()> {
        if !self.birth.is_other_process() {
            return Ok(());
        }
        let threads = self.threads.len();
        let stale = std::mem::replace(self, Pool::new(threads)?);
        drop(stale); // its Drop sees the other process and waits for nothing
        Ok(())
    }

    /// Runs `job` on the pool (it may use rayon's parallel iterators) and waits for it.
    /// A panic inside the job is raised again here.
    pub fn run(&self, job: &(dyn Fn() + Sync)) {
        // SAFETY of the lifetime erasure: this function does not return before the
        // dispatcher has reported `Done`, after which it never touches the pointer again.
        let job: *const Job =
            unsafe { std::mem::transmute::<&(dyn Fn() + Sync), &'static Job>(job) };
        let mut slot = lock(&self.shared.slot);
        *slot = Slot::Request(job);
        self.shared.changed.notify_all();
        loop {
            if let Slot::Done(_) = &*slot {
                break;
            }
            slot = self
                .shared
                .changed
                .wait(slot)
                .unwrap_or_else(|e| e.into_inner());
        }
        if let Slot::Done(Some(panic)) = std::mem::replace(&mut *slot, Slot::Idle) {
            drop(slot);
            resume_unwind(panic);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if self.birth.is_other_process() {
            // The threads, and whatever they held, are the parent's: wait for none of it.
            std::mem::forget(self.rayon.take());
            std::mem::forget(std::mem::take(&mut self.threads));
            return;
        }
        *lock(&self.shared.slot) = Slot::Exit;
        self.shared.changed.notify_all();
        // Dropping the rayon pool tells its threads to finish; then join them.
        drop(self.rayon.take());
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

fn wait_until(alive: &(Mutex<usize>, Condvar), done: impl Fn(usize) -> bool) {
    let mut running = alive.0.lock().unwrap_or_else(|e| e.into_inner());
    while !done(*running) {
        running = alive.1.wait(running).unwrap_or_else(|e| e.into_inner());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn dispatch(shared: &Shared) {
    let mut slot = lock(&shared.slot);
    loop {
        match std::mem::replace(&mut *slot, Slot::Running) {
            Slot::Request(job) => {
                drop(slot);
                // SAFETY: the caller of `run` keeps the job alive until it sees `Done`.
                let outcome = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)() }));
                slot = lock(&shared.slot);
                *slot = Slot::Done(outcome.err());
                shared.changed.notify_all();
            }
            Slot::Exit => {
                *slot = Slot::Exit;
                return;
            }
            other => {
                *slot = other;
                slot = shared.changed.wait(slot).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

//! A function applied to a batch of items in parallel, on a pool of long-lived threads.
//!
//! weft-blk runs the requests of a virtqueue batch, and the chunk fetches of a read that
//! spans several chunks, in parallel: each may wait on a cold file read. Spawning
//! threads for every batch cost more than a 4 KiB read served from the page cache, so
//! the work goes to one pool of [`POOL_THREADS`] threads kept for the process's life
//! (`rayon-core`), and the calling thread works on the first group itself instead of
//! waiting idle. The pool is larger than the host's cores on purpose: its tasks block on
//! I/O more than they compute.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

/// Threads of the shared pool.
pub const POOL_THREADS: usize = 16;

fn pool() -> Option<&'static rayon_core::ThreadPool> {
    static POOL: OnceLock<Option<rayon_core::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon_core::ThreadPoolBuilder::new()
            .num_threads(POOL_THREADS)
            .thread_name(|i| format!("weft-par-{i}"))
            .build()
            .map_err(|e| tracing::warn!("no thread pool ({e}); running batches on one thread"))
            .ok()
    })
    .as_ref()
}

/// Applies `f` to every item of `items`, at most `threads` groups of contiguous items
/// at once, and returns the results in item order. A group in which `f` panicked
/// contributes no results (the panic does not reach the caller).
pub fn map<T, R, F>(items: Vec<T>, threads: usize, f: F) -> Vec<R>
where
    T: Send,
    R: Send,
    F: Fn(T) -> R + Sync,
{
    let run = |g: Vec<T>| -> Vec<R> {
        catch_unwind(AssertUnwindSafe(|| g.into_iter().map(&f).collect())).unwrap_or_default()
    };
    let Some(pool) = pool().filter(|_| items.len() > 1) else {
        return run(items);
    };
    let per = items.len().div_ceil(threads.max(1));
    let mut groups: Vec<Vec<T>> = Vec::new();
    let mut it = items.into_iter().peekable();
    while it.peek().is_some() {
        groups.push(it.by_ref().take(per).collect());
    }
    let mut results: Vec<Vec<R>> = groups.iter().map(|_| Vec::new()).collect();
    let mut groups = groups.into_iter();
    let first = groups.next().unwrap_or_default();
    let (head, rest) = results.split_at_mut(1);
    let run = &run;
    pool.in_place_scope(|s| {
        for (g, out) in groups.zip(rest.iter_mut()) {
            s.spawn(move |_| *out = run(g));
        }
        head[0] = run(first);
    });
    results.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn results_keep_the_items_order() {
        let out = super::map((0..37).collect(), 8, |x: u32| x * 2);
        assert_eq!(out, (0..37).map(|x| x * 2).collect::<Vec<_>>());
        assert_eq!(super::map(vec![5u8], 8, |x| x + 1), vec![6]);
        assert!(super::map(Vec::<u8>::new(), 8, |x| x).is_empty());
    }

    #[test]
    fn a_panicking_group_loses_only_its_results() {
        let out = super::map((0..8).collect(), 4, |x: u32| {
            assert!(x != 5, "boom");
            x
        });
        assert_eq!(out, [0, 1, 2, 3, 6, 7]);
    }

    #[test]
    fn nested_maps_finish() {
        let out = super::map((0..16).collect(), 8, |x: u32| {
            super::map((0..4).collect(), 4, |y: u32| x * 10 + y)
                .into_iter()
                .sum::<u32>()
        });
        assert_eq!(out.len(), 16);
        assert_eq!(out[1], 10 * 4 + 6);
    }
}

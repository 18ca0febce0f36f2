//! A function applied to a batch of items on a few scoped threads.

/// Applies `f` to every item of `items` on at most `threads` scoped threads (the items
/// split into contiguous groups) and returns the results in item order. A group whose
/// thread panicked contributes no results.
pub fn map<T, R, F>(items: Vec<T>, threads: usize, f: F) -> Vec<R>
where
    T: Send,
    R: Send,
    F: Fn(T) -> R + Sync,
{
    if items.len() <= 1 {
        return items.into_iter().map(f).collect();
    }
    let per = items.len().div_ceil(threads.max(1));
    let mut groups: Vec<Vec<T>> = Vec::new();
    let mut it = items.into_iter().peekable();
    while it.peek().is_some() {
        groups.push(it.by_ref().take(per).collect());
    }
    let f = &f;
    std::thread::scope(|sc| {
        let handles: Vec<_> = groups
            .into_iter()
            .map(|g| sc.spawn(move || g.into_iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
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
}

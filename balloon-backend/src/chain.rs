//! Walking a guest's descriptor chain with bounds of our own: the
//! `virtio-queue` iterator stops a chain only when it has visited as many
//! descriptors as the table holds, so a loop or an over-long chain would
//! otherwise cost a whole queue's worth of work per request and be counted
//! under no name.

use virtio_queue::desc::split::Descriptor;

/// Most descriptors one balloon request may use. Linux sends one for
/// inflate, deflate and statistics, and at most 32 (its
/// `PAGE_REPORTING_CAPACITY`) for a free page report.
pub const MAX_CHAIN_DESCRIPTORS: usize = 32;

/// Why a chain was cut short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainCut {
    /// A descriptor links back to one already visited in this chain.
    Loop,
    /// More than `MAX_CHAIN_DESCRIPTORS` descriptors.
    TooLong,
}

/// The descriptors of a chain starting at `head_index`, up to the first
/// repeated index or `MAX_CHAIN_DESCRIPTORS`, and why it was cut, if it was.
///
/// A looping descriptor is kept (its buffer is as valid as any other); only
/// the walk stops there.
pub fn bounded_chain(
    head_index: u16,
    descriptors: impl Iterator<Item = Descriptor>,
) -> (Vec<Descriptor>, Option<ChainCut>) {
    let mut visited = Vec::with_capacity(MAX_CHAIN_DESCRIPTORS + 1);
    visited.push(head_index);
    let mut kept = Vec::new();
    for descriptor in descriptors {
        if kept.len() == MAX_CHAIN_DESCRIPTORS {
            return (kept, Some(ChainCut::TooLong));
        }
        kept.push(descriptor);
        if descriptor.has_next() {
            if visited.contains(&descriptor.next()) {
                return (kept, Some(ChainCut::Loop));
            }
            visited.push(descriptor.next());
        }
    }
    (kept, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;

    /// A descriptor table walked the way the queue walks it, from `head`.
    fn walk(table: &[(u16, u16)], head: u16) -> impl Iterator<Item = Descriptor> + '_ {
        let mut index = Some(head);
        let mut ttl = table.len();
        std::iter::from_fn(move || {
            let (flags, next) = *table.get(usize::from(index?))?;
            ttl = ttl.checked_sub(1)?;
            index = (flags & NEXT != 0).then_some(next);
            Some(Descriptor::new(0x1000, 4, flags, next))
        })
    }

    #[test]
    fn a_self_loop_is_cut_at_once() {
        let table = [(NEXT, 0)];
        let (kept, cut) = bounded_chain(0, walk(&table, 0));
        assert_eq!(kept.len(), 1);
        assert_eq!(cut, Some(ChainCut::Loop));
    }

    #[test]
    fn a_long_chain_without_a_loop_is_cut_at_the_cap() {
        let table: Vec<(u16, u16)> = (1..=64)
            .map(|i| (if i < 64 { NEXT } else { 0 }, i))
            .collect();
        let (kept, cut) = bounded_chain(0, walk(&table, 0));
        assert_eq!(kept.len(), MAX_CHAIN_DESCRIPTORS);
        assert_eq!(cut, Some(ChainCut::TooLong));
        // Exactly the cap is fine.
        let table: Vec<(u16, u16)> = (1..=32)
            .map(|i| (if i < 32 { NEXT } else { 0 }, i))
            .collect();
        let (kept, cut) = bounded_chain(0, walk(&table, 0));
        assert_eq!((kept.len(), cut), (32, None));
    }

    proptest! {
        #[test]
        fn never_more_than_the_cap_and_loops_are_named(
            table in proptest::collection::vec((any::<bool>(), 0u16..80), 1..80),
            head in 0u16..80,
        ) {
            let table: Vec<(u16, u16)> = table
                .into_iter()
                .map(|(next, to)| (if next { NEXT } else { 0 }, to))
                .collect();
            let (kept, cut) = bounded_chain(head, walk(&table, head));
            prop_assert!(kept.len() <= MAX_CHAIN_DESCRIPTORS);
            // Follow the table by hand: a repeat within the kept part is a loop.
            let mut seen = vec![head];
            let mut index = head;
            let mut looped = false;
            for descriptor in &kept {
                prop_assert_eq!(Some(&(descriptor.flags(), descriptor.next())), table.get(usize::from(index)));
                if !descriptor.has_next() { break; }
                index = descriptor.next();
                if seen.contains(&index) { looped = true; break; }
                seen.push(index);
            }
            prop_assert_eq!(cut == Some(ChainCut::Loop), looped);
        }
    }
}

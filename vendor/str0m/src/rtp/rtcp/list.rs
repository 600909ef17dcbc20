use std::fmt;
use std::ops::Index;

/// List containing max 31 items.
///
/// sluice: held in a `Vec` bounded at 31, not an inline `[Option<T>; 31]`. The array made an SDES
/// list (`ReportList<Sdes>`, each `Sdes` holding a `ReportList` of its own) 31 KB, zeroed and
/// copied twice for every SDES block parsed and for every sender report built; a reception-report
/// list was 1 KB inside every `Rtcp` value moved.
#[derive(Clone, PartialEq, Eq)]
pub struct ReportList<T>(Vec<T>);

/// How many items one list holds (RTCP's 5-bit count).
const MAX: usize = 31;

impl<T> ReportList<T> {
    pub(crate) fn new() -> Self {
        ReportList::default()
    }

    /// Number of elements in the list.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Append `v`. Panics when the list is full, as the array did; callers check `is_full`.
    pub(crate) fn push(&mut self, v: T) {
        assert!(self.0.len() < MAX, "ReportList holds at most {MAX} items");
        self.0.push(v);
    }

    /// Get element at position.
    pub fn get(&self, i: usize) -> Option<&T> {
        self.0.get(i)
    }

    /// Iterator over the elements in the list.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.into_iter()
    }

    /// Tells if the list contains zero elements.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn lists_from_iter(iterator: impl IntoIterator<Item = T>) -> Vec<Self> {
        let mut result = vec![];
        let mut current = Self::default();

        for item in iterator {
            if current.is_full() {
                result.push(std::mem::take(&mut current));
            }
            current.push(item);
        }

        if !current.is_empty() {
            result.push(current);
        }

        result
    }

    pub(crate) fn is_full(&self) -> bool {
        self.0.len() == MAX
    }
}

impl<T: private::WordSized> ReportList<T> {
    /// Move items from the front of `other` to the end of `self` while they fit in `words_left`
    /// and `self` has room. Returns how many moved.
    pub(crate) fn append_all_possible(&mut self, other: &mut Self, mut words_left: usize) -> usize {
        let max = (MAX - self.0.len()).min(other.0.len());
        let mut n = 0;
        while n < max {
            let item_size = other.0[n].word_size();
            if words_left < item_size {
                break;
            }
            words_left -= item_size;
            n += 1;
        }
        self.0.extend(other.0.drain(..n));
        n
    }
}

pub(crate) mod private {
    pub trait WordSized {
        fn word_size(&self) -> usize;
    }
}

impl<T> Index<usize> for ReportList<T> {
    type Output = T;

    fn index(&self, index: usize) -> &Self::Output {
        &self.0[index]
    }
}

impl<T> Default for ReportList<T> {
    fn default() -> Self {
        ReportList(Vec::new())
    }
}

impl<'a, T> IntoIterator for &'a ReportList<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<T> IntoIterator for ReportList<T> {
    type Item = T;
    type IntoIter = std::vec::IntoIter<T>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<T> From<T> for ReportList<T> {
    fn from(t: T) -> Self {
        ReportList(vec![t])
    }
}

impl<T: fmt::Debug> fmt::Debug for ReportList<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[")?;
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{s:?}")?;
        }
        write!(f, "]")
    }
}

#[cfg(test)]
mod test {
    use super::ReportList;

    #[test]
    fn test_lists_from_iter() {
        let lists = ReportList::lists_from_iter(0..66);

        assert_eq!(lists.len(), 3);
        assert_eq!(lists[0].len(), 31);
        assert_eq!(lists[1].len(), 31);
        assert_eq!(lists[2].len(), 4);
    }

    #[test]
    fn test_max_length_iter() {
        let list = {
            let mut list = ReportList::new();
            for i in 1..=31 {
                list.push(i);
            }

            list
        };
        let sum: u64 = list.iter().sum();

        assert_eq!(sum, 496);
    }

    #[test]
    fn test_max_length_into_iter() {
        let list = {
            let mut list = ReportList::new();
            for i in 1..=31 {
                list.push(i);
            }

            list
        };
        let sum: u64 = list.into_iter().sum();

        assert_eq!(sum, 496);
    }
}

//! A memory budget for deserializing an image. Postcard is compact (an empty inode is a dozen
//! bytes, a directory entry two), so a payload within [`super::MAX_RAW_PAYLOAD`] could still
//! decode to many gigabytes of tables; every list and map of the image is therefore read
//! through [`vec`] / [`map`], which charge each element's in-memory size against a per-thread
//! budget set by [`with_budget`] (only `decode_image` sets one) and fail once it is spent.

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

thread_local! {
    /// Bytes left while a budgeted decode runs on this thread (`None` otherwise).
    static LEFT: Cell<Option<u64>> = const { Cell::new(None) };
    /// Set when the running decode ran out of budget (some deserializers, postcard among them,
    /// drop custom error messages, so the reason is reported from here).
    static SPENT: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with a budget of `bytes` for the tables it deserializes on this thread; `Err` names
/// the limit when the budget ran out (whatever `f` returned then).
pub(crate) fn with_budget<T>(bytes: u64, f: impl FnOnce() -> T) -> Result<T, String> {
    struct Restore(Option<u64>, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            LEFT.with(|l| l.set(self.0));
            SPENT.with(|s| s.set(self.1));
        }
    }
    let _restore = Restore(
        LEFT.with(|l| l.replace(Some(bytes))),
        SPENT.with(|s| s.replace(false)),
    );
    let out = f();
    if SPENT.with(|s| s.get()) {
        return Err(format!(
            "decoded tables exceed the memory limit of {bytes} bytes"
        ));
    }
    Ok(out)
}

/// Charges `bytes` against the budget, if one is set.
fn charge<E: serde::de::Error>(bytes: usize) -> Result<(), E> {
    LEFT.with(|l| match l.get() {
        None => Ok(()),
        Some(left) => match left.checked_sub(bytes as u64) {
            Some(rest) => {
                l.set(Some(rest));
                Ok(())
            }
            None => {
                SPENT.with(|s| s.set(true));
                Err(E::custom("decoded tables exceed the memory limit"))
            }
        },
    })
}

/// Deserializes a `Vec<T>`, charging `size_of::<T>()` per element before reading it.
pub(crate) fn vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a sequence")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            loop {
                charge::<A::Error>(std::mem::size_of::<T>().max(1))?;
                match seq.next_element()? {
                    Some(x) => out.push(x),
                    None => return Ok(out),
                }
            }
        }
    }
    d.deserialize_seq(V(PhantomData))
}

/// Deserializes a `BTreeMap<String, String>`, charging each entry (and its tree node share).
pub(crate) fn map<'de, D>(d: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: Deserializer<'de>,
{
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            loop {
                charge::<A::Error>(2 * std::mem::size_of::<(String, String)>())?;
                match m.next_entry::<String, String>()? {
                    Some((k, v)) => {
                        if out.insert(k, v).is_some() {
                            return Err(A::Error::custom("duplicate tag"));
                        }
                    }
                    None => return Ok(out),
                }
            }
        }
    }
    d.deserialize_map(V)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct T {
        #[serde(deserialize_with = "vec")]
        v: Vec<u64>,
    }

    #[test]
    fn budget_stops_a_long_list() {
        let bytes = postcard::to_stdvec(&T { v: vec![0; 1000] }).unwrap();
        // Unbudgeted (not an image decode): fine.
        assert!(postcard::from_bytes::<T>(&bytes).is_ok());
        assert!(matches!(
            with_budget(8 * 1001, || postcard::from_bytes::<T>(&bytes)),
            Ok(Ok(_))
        ));
        match with_budget(8 * 999, || postcard::from_bytes::<T>(&bytes)) {
            Err(e) => assert!(e.contains("memory limit of 7992 bytes"), "{e}"),
            Ok(_) => panic!("a list past the budget was decoded"),
        }
        // The budget is gone afterwards.
        assert!(postcard::from_bytes::<T>(&bytes).is_ok());
    }
}

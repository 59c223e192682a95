//! Which positions of a sequence to analyse.

use anyhow::{bail, Context, Result};

/// A `--positions` value: `all`, `last`, or a comma-separated list of indices and inclusive
/// ranges `a..b` / `a-b` (`0,3,10..12`). Negative indices count from the end (`-1` = last).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PositionSpec {
    /// Every position `0..T`.
    All,
    /// Only `T − 1`.
    Last,
    /// Explicit items.
    List(Vec<Item>),
}

/// One item of a position list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item {
    /// A single index (negative: from the end).
    One(i64),
    /// An inclusive range.
    Range(i64, i64),
}

impl std::str::FromStr for PositionSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        match s {
            "all" => return Ok(PositionSpec::All),
            "last" => return Ok(PositionSpec::Last),
            "" => bail!("empty --positions: use all, last, or a list such as 0,3,10..12"),
            _ => {}
        }
        let parse = |x: &str| -> Result<i64> {
            x.trim().parse::<i64>().with_context(|| {
                format!("invalid position {x:?} in --positions {s:?}: use all, last, or a list such as 0,3,10..12")
            })
        };
        let items = s
            .split(',')
            .map(|part| {
                let part = part.trim();
                if let Some((a, b)) = part.split_once("..") {
                    Ok(Item::Range(parse(a)?, parse(b)?))
                } else if let Some((a, b)) = part.split_once('-').filter(|(a, _)| !a.is_empty()) {
                    Ok(Item::Range(parse(a)?, parse(b)?))
                } else {
                    Ok(Item::One(parse(part)?))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PositionSpec::List(items))
    }
}

impl PositionSpec {
    /// The sorted, de-duplicated positions for a sequence of length `len`; errors name the
    /// offending value and the valid range.
    pub fn resolve(&self, len: usize) -> Result<Vec<usize>> {
        if len == 0 {
            bail!("the sequence is empty: nothing to analyse");
        }
        let index = |i: i64| -> Result<usize> {
            let j = if i < 0 { len as i64 + i } else { i };
            if j < 0 || j >= len as i64 {
                bail!(
                    "position {i} is out of range: the sequence has {len} tokens (positions 0..={}, or -1 for the last)",
                    len - 1
                );
            }
            Ok(j as usize)
        };
        let mut out = match self {
            PositionSpec::All => (0..len).collect(),
            PositionSpec::Last => vec![len - 1],
            PositionSpec::List(items) => {
                let mut v = Vec::new();
                for item in items {
                    match *item {
                        Item::One(i) => v.push(index(i)?),
                        Item::Range(a, b) => {
                            let (a, b) = (index(a)?, index(b)?);
                            if a > b {
                                bail!(
                                    "empty position range {a}..{b}: write the smaller index first"
                                );
                            }
                            v.extend(a..=b);
                        }
                    }
                }
                v
            }
        };
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_resolves() {
        let p: PositionSpec = "0, 3, 5..7, -1".parse().unwrap();
        assert_eq!(p.resolve(10).unwrap(), vec![0, 3, 5, 6, 7, 9]);
        assert_eq!("all".parse::<PositionSpec>().unwrap().resolve(3).unwrap(), vec![0, 1, 2]);
        assert_eq!("last".parse::<PositionSpec>().unwrap().resolve(3).unwrap(), vec![2]);
        assert_eq!("2-4".parse::<PositionSpec>().unwrap().resolve(6).unwrap(), vec![2, 3, 4]);
        let e = "12".parse::<PositionSpec>().unwrap().resolve(10).unwrap_err().to_string();
        assert!(e.contains("position 12") && e.contains("0..=9"), "{e}");
        assert!("x".parse::<PositionSpec>().is_err());
        assert!("5..2".parse::<PositionSpec>().unwrap().resolve(10).is_err());
    }
}

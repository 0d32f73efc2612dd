//! Which tests a run reports and runs: name filters, `--skip`, filter
//! expressions (`-E`, `--tag`), ignored tests, and `--partition`.

use std::str::FromStr;

use sha2::{Digest, Sha256};

use super::RunOptions;
use crate::host::TestCase;

/// Which ignored tests run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IgnoredMode {
    /// Skip ignored tests.
    #[default]
    Skip,
    /// Run only the ignored tests.
    Only,
    /// Run ignored tests too.
    Include,
}

/// One planned test: run it, or report it ignored.
#[derive(Debug, Clone)]
pub struct PlannedTest {
    /// The test as the suite declared it.
    pub case: TestCase,
    /// False for an ignored test that is reported but not run.
    pub run: bool,
}

/// The tests a run will report, in suite order.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Selected tests.
    pub tests: Vec<PlannedTest>,
    /// Tests left out by filters.
    pub filtered_out: usize,
}

/// One shard of a run split over several machines (`--partition`), as nextest
/// splits: `count:M/N` deals the selected tests out in turn, `hash:M/N` puts each
/// test in the shard its name hashes to, so it stays there when tests are added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// How tests are dealt out.
    pub kind: PartitionKind,
    /// This shard, from 1.
    pub shard: u64,
    /// Shards in all.
    pub total: u64,
}

/// How `--partition` deals tests out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionKind {
    /// In turn, in plan order.
    Count,
    /// By a hash of the test's name.
    Hash,
}

impl FromStr for Partition {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage =
            || format!("`{s}` is not a partition: use count:M/N or hash:M/N, e.g. hash:1/3");
        let (kind, rest) = s.split_once(':').ok_or_else(usage)?;
        let kind = match kind {
            "count" => PartitionKind::Count,
            "hash" => PartitionKind::Hash,
            _ => return Err(usage()),
        };
        let (shard, total) = rest.split_once('/').ok_or_else(usage)?;
        let (Ok(shard), Ok(total)) = (shard.parse::<u64>(), total.parse::<u64>()) else {
            return Err(usage());
        };
        if total == 0 {
            return Err(format!("`{s}`: the number of shards must be at least 1"));
        }
        if shard == 0 || shard > total {
            return Err(format!("`{s}`: the shard must be from 1 to {total}"));
        }
        Ok(Self { kind, shard, total })
    }
}

impl Partition {
    /// True when this shard runs the test named `name`, the `selected`-th (from 0)
    /// of the tests the filters selected.
    fn includes(&self, selected: usize, name: &str) -> bool {
        let bucket = match self.kind {
            PartitionKind::Count => selected as u64,
            PartitionKind::Hash => {
                // The same shard on every machine and architecture: sha256, read big-endian.
                let digest = Sha256::digest(name.as_bytes());
                let mut first = [0u8; 8];
                first.copy_from_slice(&digest[..8]);
                u64::from_be_bytes(first)
            }
        };
        bucket % self.total == self.shard - 1
    }
}

/// Selects tests the way libtest does (filters, `--exact`, `--skip`, ignored
/// handling), then by the filter expression, then this shard's part of them.
pub fn plan(suite: &str, cases: &[TestCase], opts: &RunOptions) -> Plan {
    let mut plan = Plan::default();
    let mut selected = 0;
    for case in cases {
        // A filter matches the test's name or its `suite::name`, as --list prints it.
        let full = format!("{suite}::{}", case.name);
        let by_name = opts.filters.is_empty()
            || opts.filters.iter().any(|f| {
                if opts.exact {
                    case.name == *f || full == *f
                } else {
                    case.name.contains(f.as_str()) || full.contains(f.as_str())
                }
            });
        let skipped = opts.skip.iter().any(|s| full.contains(s.as_str()));
        let by_expr = opts.expr.as_ref().is_none_or(|e| e.matches(case));
        let wanted = match opts.ignored {
            IgnoredMode::Only => case.ignored,
            IgnoredMode::Skip | IgnoredMode::Include => true,
        };
        if !by_name || skipped || !by_expr || !wanted {
            plan.filtered_out += 1;
            continue;
        }
        let in_shard = opts
            .partition
            .is_none_or(|p| p.includes(selected, &case.name));
        selected += 1;
        if !in_shard {
            plan.filtered_out += 1;
            continue;
        }
        let run = !case.ignored || opts.ignored != IgnoredMode::Skip;
        if !run && opts.omit_ignored {
            plan.filtered_out += 1;
            continue;
        }
        plan.tests.push(PlannedTest {
            case: case.clone(),
            run,
        });
    }
    plan
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;
    use crate::runner::FilterExpr;

    fn case(name: &str, ignored: bool) -> TestCase {
        TestCase {
            name: name.into(),
            ignored,
            timeout_ms: None,
            tags: vec![],
        }
    }

    fn many(n: usize) -> Vec<TestCase> {
        (0..n)
            .map(|i| case(&format!("t{i:03}"), i % 7 == 0))
            .collect()
    }

    #[rstest]
    #[case::count("count")]
    #[case::hash("hash")]
    fn shards_together_plan_every_test_once(#[case] kind: &str) {
        let cases = many(100);
        for total in [1, 2, 3, 7] {
            let mut seen: Vec<String> = Vec::new();
            for shard in 1..=total {
                let partition: Partition =
                    format!("{kind}:{shard}/{total}").parse().expect("parses");
                let opts = RunOptions {
                    partition: Some(partition),
                    ..RunOptions::default()
                };
                let plan = plan("s", &cases, &opts);
                assert_eq!(plan.tests.len() + plan.filtered_out, cases.len());
                if total > 1 {
                    assert!(
                        !plan.tests.is_empty() && plan.tests.len() < 100,
                        "{kind} {shard}/{total}"
                    );
                }
                seen.extend(plan.tests.iter().map(|t| t.case.name.clone()));
            }
            seen.sort();
            let all: Vec<String> = cases.iter().map(|c| c.name.clone()).collect();
            assert_eq!(seen, all, "{kind} over {total} shards");
        }
    }

    #[test]
    fn count_deals_tests_in_turn_and_hash_keeps_a_test_where_it_was() {
        let opts = |p: &str| RunOptions {
            partition: Some(p.parse().expect("parses")),
            ..RunOptions::default()
        };
        let first = plan("s", &many(6), &opts("count:1/2"));
        assert_eq!(
            names(&first)
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>(),
            ["t000", "t002", "t004"]
        );
        // A test's hash shard does not depend on the other tests.
        let alone = plan("s", &[case("t003", false)], &opts("hash:2/3"));
        let among = plan("s", &many(10), &opts("hash:2/3"));
        assert_eq!(
            alone.tests.is_empty(),
            !among.tests.iter().any(|t| t.case.name == "t003")
        );
    }

    #[rstest]
    #[case::no_kind("1/2", "count:M/N or hash:M/N")]
    #[case::zero("count:0/2", "from 1 to 2")]
    #[case::past("hash:3/2", "from 1 to 2")]
    #[case::none("count:1/0", "at least 1")]
    #[case::words("count:a/b", "count:M/N or hash:M/N")]
    fn bad_partitions_say_what_is_wanted(#[case] text: &str, #[case] needle: &str) {
        let err = text.parse::<Partition>().expect_err(text);
        assert!(err.contains(needle), "{text}: {err}");
    }

    #[test]
    fn omitted_ignored_tests_are_not_in_the_plan() {
        let cases = [case("a", false), case("b", true)];
        let opts = RunOptions {
            omit_ignored: true,
            ..RunOptions::default()
        };
        let plan = plan("s", &cases, &opts);
        assert_eq!(names(&plan), [("a".to_string(), true)]);
        assert_eq!(plan.filtered_out, 1);
        // Asked for, an ignored test runs and is reported.
        let opts = RunOptions {
            omit_ignored: true,
            ignored: IgnoredMode::Include,
            ..RunOptions::default()
        };
        assert_eq!(plan_len(&cases, &opts), 2);
    }

    fn plan_len(cases: &[TestCase], opts: &RunOptions) -> usize {
        plan("s", cases, opts).tests.len()
    }

    #[test]
    fn an_expression_selects_by_tag() {
        let mut tagged = case("exec_one", false);
        tagged.tags = vec!["exec".into()];
        let cases = [tagged, case("plain", false)];
        let opts = RunOptions {
            expr: Some(FilterExpr::parse("tag(exec)").expect("parses")),
            ..RunOptions::default()
        };
        let plan = plan("s", &cases, &opts);
        assert_eq!(names(&plan), [("exec_one".to_string(), true)]);
        assert_eq!(plan.filtered_out, 1);
    }

    fn names(plan: &Plan) -> Vec<(String, bool)> {
        plan.tests
            .iter()
            .map(|t| (t.case.name.clone(), t.run))
            .collect()
    }

    #[rstest]
    #[case::all(&[], false, &[], IgnoredMode::Skip, &[("alpha", true), ("alphabet", true), ("beta", false)], 0)]
    #[case::filter(&["alpha"], false, &[], IgnoredMode::Skip, &[("alpha", true), ("alphabet", true)], 1)]
    #[case::exact(&["alpha"], true, &[], IgnoredMode::Skip, &[("alpha", true)], 2)]
    #[case::exact_as_listed(&["s::alpha"], true, &[], IgnoredMode::Skip, &[("alpha", true)], 2)]
    #[case::filter_as_listed(&["s::alph"], false, &[], IgnoredMode::Skip, &[("alpha", true), ("alphabet", true)], 1)]
    #[case::skip(&[], false, &["bet"], IgnoredMode::Skip, &[("alpha", true)], 2)]
    #[case::only_ignored(&[], false, &[], IgnoredMode::Only, &[("beta", true)], 2)]
    #[case::include_ignored(&[], false, &[], IgnoredMode::Include, &[("alpha", true), ("alphabet", true), ("beta", true)], 0)]
    fn planning(
        #[case] filters: &[&str],
        #[case] exact: bool,
        #[case] skip: &[&str],
        #[case] ignored: IgnoredMode,
        #[case] expected: &[(&str, bool)],
        #[case] filtered_out: usize,
    ) {
        let cases = [
            case("alpha", false),
            case("alphabet", false),
            case("beta", true),
        ];
        let opts = RunOptions {
            filters: filters.iter().map(|s| s.to_string()).collect(),
            exact,
            skip: skip.iter().map(|s| s.to_string()).collect(),
            ignored,
            ..RunOptions::default()
        };
        let plan = plan("s", &cases, &opts);
        let expected: Vec<(String, bool)> =
            expected.iter().map(|(n, r)| (n.to_string(), *r)).collect();
        assert_eq!(names(&plan), expected);
        assert_eq!(plan.filtered_out, filtered_out);
    }
}

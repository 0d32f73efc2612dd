//! docs/ci.md holds the very files these tests give the tools.

use super::*;
use crate::avocado::{AVOCADO_HINT, AVOCADO_JOB_PY, AVOCADO_RECIPE_PY};
use crate::meson::{MESON_BUILD, MESON_OPTIONS};

/// docs/ci.md shows the files these tests give the tools, word for word.
#[test]
fn docs_show_the_files_these_tests_use() {
    let path = repo().join("docs/ci.md");
    let docs = std::fs::read_to_string(&path).expect("docs/ci.md");
    for (name, snippet) in [
        ("meson.build", MESON_BUILD),
        ("meson_options.txt", MESON_OPTIONS),
        (".avocado.hint", AVOCADO_HINT),
        ("recipe.py", AVOCADO_RECIPE_PY),
        ("job.py", AVOCADO_JOB_PY),
    ] {
        assert!(
            docs.contains(snippet),
            "docs/ci.md does not show this {name} word for word:\n{snippet}"
        );
    }
}

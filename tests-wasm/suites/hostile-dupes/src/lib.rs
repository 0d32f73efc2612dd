//! A malformed suite: two tests share a name and one has none. The runtime must
//! refuse it before running anything, naming both problems.

fn first() {}

fn second() {}

fn unnamed() {}

fn fine() {}

matryoshka_guest::suite! {
    tests: [
        #[name("twice")] first,
        fine,
        #[name("twice")] second,
        #[name("")] unnamed,
    ],
}

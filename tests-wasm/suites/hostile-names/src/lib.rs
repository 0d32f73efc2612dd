//! Untrusted text: test names, failure messages and output that hold newlines,
//! terminal escapes, carriage returns, line separators, bidirectional overrides,
//! `]]>` and characters XML 1.0 forbids. Every report must keep them inert: one
//! line per test, no raw control character, well-formed XML, no forged TAP line.

/// A failure message that tries every trick at once.
const HOSTILE_MESSAGE: &str = "bad \x1b[2J\x1b]0;pwned\x07 ]]> <![CDATA[x]]> \0\u{fffe}\n\
                               ok 99 - injected\n  ...\nnot ok 98 - injected";

fn passes() {}

fn hostile_message() {
    panic!("{HOSTILE_MESSAGE}");
}

fn fails() {
    panic!("this test fails");
}

fn noisy_output() {
    println!("stdout \x1b[2J\x1b]0;pwned\x07 ]]> <![CDATA[ \0\u{fffe}");
    println!("progress 50%\rnot ok 1 - injected from stdout");
    eprintln!("stderr \x1b[31mred\x1b[0m \u{9b}31m");
    log::warn!("log \x1b[5mblink\x1b[0m\nok 77 - injected from a log line");
    panic!("noisy output above");
}

matryoshka_guest::suite! {
    tests: [
        #[name("line\nbreak")] passes,
        #[name("esc\x1b[31mred\x1b[0m")] passes,
        #[name("cdata ]]> <b>&amp;")] hostile_message,
        #[name("sneaky # TODO not really")] fails,
        #[name("fake\nok 42 - injected")] fails,
        #[name("cr\rnot ok 7 - injected \u{85}nel \u{2028}ls \u{202e}bidi")] passes,
        #[name("nul\0bell\x07 nonchar\u{fffe}")] passes,
        noisy_output,
        #[ignore] #[name("ignored\x1b[8m # SKIP")] passes,
    ],
}

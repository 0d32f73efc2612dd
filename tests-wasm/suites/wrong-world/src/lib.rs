//! A component that exports `greet` instead of the `matryoshka:test/suite` world.

wit_bindgen::generate!({
    inline: "
        package example:other;
        world greeter {
            export greet: func() -> string;
        }
    ",
});

struct Greeter;

impl Guest for Greeter {
    fn greet() -> String {
        "hello".to_string()
    }
}

export!(Greeter);

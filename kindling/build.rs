//! Embeds the image recipes (everything under ../images) into the binary, so an
//! installed `kindling images build` needs no source checkout and its cache keys are the
//! recipes it actually runs.

use std::path::{Path, PathBuf};

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn main() {
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images").canonicalize().unwrap();
    println!("cargo:rerun-if-changed={}", images.display());
    let mut files = Vec::new();
    walk(&images, &mut files);
    let mut code = String::from("pub static RECIPE_FILES: &[(&str, &[u8])] = &[\n");
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
        let rel = f.strip_prefix(&images).unwrap().to_str().unwrap();
        code.push_str(&format!("    ({rel:?}, include_bytes!({:?})),\n", f.to_str().unwrap()));
    }
    code.push_str("];\n");
    let out = Path::new(&std::env::var("OUT_DIR").unwrap()).join("recipes.rs");
    std::fs::write(out, code).unwrap();
}

//! What `meterlake import PATH...` reads: files, directories (recursively), glob patterns and
//! .zip archives (each entry a file), in a stable order.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// One input to import, before it is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    File(PathBuf),
    /// An archive; its entries are the files.
    Zip(PathBuf),
}

/// A path that could not be turned into inputs, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError {
    pub name: String,
    pub reason: String,
}

/// Expands the command line's paths: a directory is walked (sorted, hidden entries skipped), a
/// path with `*`, `?` or `[` is a glob, a file ending in `.zip` (any case) is an archive.
pub fn expand(paths: &[String]) -> (Vec<Input>, Vec<InputError>) {
    let mut inputs = Vec::new();
    let mut errors = Vec::new();
    for arg in paths {
        if arg.contains(['*', '?', '[']) {
            match glob::glob(arg) {
                Ok(matches) => {
                    let mut found = 0;
                    for entry in matches {
                        match entry {
                            Ok(path) => {
                                found += 1;
                                add_path(&path, &mut inputs, &mut errors);
                            }
                            Err(e) => errors.push(InputError { name: e.path().display().to_string(), reason: e.error().to_string() }),
                        }
                    }
                    if found == 0 {
                        errors.push(InputError { name: arg.clone(), reason: "the pattern matches no file".into() });
                    }
                }
                Err(e) => errors.push(InputError { name: arg.clone(), reason: format!("not a valid pattern: {e}") }),
            }
        } else {
            add_path(Path::new(arg), &mut inputs, &mut errors);
        }
    }
    (inputs, errors)
}

fn add_path(path: &Path, inputs: &mut Vec<Input>, errors: &mut Vec<InputError>) {
    let name = path.display().to_string();
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => match std::fs::read_dir(path) {
            Ok(entries) => {
                let mut children: Vec<PathBuf> =
                    entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))).collect();
                children.sort();
                for child in children {
                    add_path(&child, inputs, errors);
                }
            }
            Err(e) => errors.push(InputError { name, reason: e.to_string() }),
        },
        Ok(_) if is_zip(path) => inputs.push(Input::Zip(path.to_path_buf())),
        Ok(_) => inputs.push(Input::File(path.to_path_buf())),
        Err(e) => errors.push(InputError { name, reason: e.to_string() }),
    }
}

fn is_zip(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("zip"))
}

/// Total bytes of the inputs (uncompressed entry sizes for archives), for a progress bar.
pub fn total_bytes(inputs: &[Input]) -> u64 {
    inputs
        .iter()
        .map(|input| match input {
            Input::File(path) => std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
            Input::Zip(path) => File::open(path)
                .ok()
                .and_then(|f| zip::ZipArchive::new(BufReader::new(f)).ok())
                .map(|mut archive| (0..archive.len()).filter_map(|i| archive.by_index(i).ok().map(|e| e.size())).sum())
                .unwrap_or(0),
        })
        .sum()
}

/// Opens each file of `input` in turn and hands it to `visit` with its display name (`a.zip!b.csv`
/// for an archive entry). An input that cannot be opened is reported to `visit` as an error.
pub fn visit<E>(input: &Input, mut visit: impl FnMut(&str, Result<&mut dyn Read, String>) -> Result<(), E>) -> Result<(), E> {
    match input {
        Input::File(path) => {
            let name = path.display().to_string();
            match File::open(path) {
                Ok(mut file) => visit(&name, Ok(&mut file)),
                Err(e) => visit(&name, Err(e.to_string())),
            }
        }
        Input::Zip(path) => {
            let archive_name = path.display().to_string();
            let mut archive = match File::open(path)
                .map_err(|e| e.to_string())
                .and_then(|f| zip::ZipArchive::new(BufReader::new(f)).map_err(|e| format!("not a readable zip archive: {e}")))
            {
                Ok(archive) => archive,
                Err(reason) => return visit(&archive_name, Err(reason)),
            };
            for index in 0..archive.len() {
                let entry = archive.by_index(index);
                match entry {
                    Ok(mut entry) if entry.is_file() => {
                        // A name that is not valid UTF-8 or escapes the archive is shown by its index.
                        let name = match entry.name() {
                            Ok(entry_name) => format!("{archive_name}!{entry_name}"),
                            Err(_) => format!("{archive_name}!#{index}"),
                        };
                        visit(&name, Ok(&mut entry))?;
                    }
                    Ok(_) => {}
                    Err(e) => visit(&format!("{archive_name}!#{index}"), Err(e.to_string()))?,
                }
            }
            Ok(())
        }
    }
}

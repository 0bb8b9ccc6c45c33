//! Shared by the benches that time handoffs themselves (shm_handoff,
//! async_handoff): leaves a median where criterion leaves its own results
//! (the two JSON files BENCHMARKS.md is generated from).

/// Records `median_ns` as `group`/`id` under target/criterion.
pub fn record_in(group: &str, id: &str, median_ns: f64) {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir_name: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let dir = target
        .join("criterion")
        .join(group)
        .join(dir_name)
        .join("new");
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        let json_id = id.replace('\\', "\\\\").replace('"', "\\\"");
        std::fs::write(
            dir.join("benchmark.json"),
            format!(
                "{{\"group_id\":\"{group}\",\"function_id\":\"{json_id}\",\"value_str\":null}}"
            ),
        )?;
        std::fs::write(
            dir.join("estimates.json"),
            format!("{{\"median\":{{\"point_estimate\":{median_ns}}}}}"),
        )
    };
    if let Err(e) = write() {
        eprintln!("could not record {id} for the report: {e}");
    }
}

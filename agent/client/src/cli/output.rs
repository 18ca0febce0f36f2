//! Printing shared by the commands: JSON, tables, `key: value` reports, and the views
//! more than one command group prints (an environment, a network setup, a job).

use weft_api::env::EnvironmentView;
use weft_api::job::Job;
use weft_api::net::NetSetup;

/// The columns of a job row ([`job_row`]).
pub(super) const JOB_HEADERS: [&str; 7] = [
    "ID", "KIND", "TARGET", "STATE", "PROGRESS", "STARTED", "ERROR",
];

pub(super) fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("weft: cannot print JSON: {e}"),
    }
}

/// Prints rows under headers with columns padded to their widest cell.
pub(super) fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

/// Prints a JSON object as `key: value` lines (nested values inline).
pub(super) fn print_report(v: &serde_json::Value) {
    match v.as_object() {
        Some(map) => {
            let width = map.keys().map(String::len).max().unwrap_or(0) + 1;
            for (k, value) in map {
                let text = match value {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => "-".into(),
                    other => other.to_string(),
                };
                println!("{:<width$} {text}", format!("{k}:"));
            }
        }
        None => println!("{v}"),
    }
}

/// Bytes in binary units: `512 B`, `1.5 MiB`.
pub(super) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

pub(super) fn job_row(j: &Job) -> Vec<String> {
    let progress = if j.total_bytes > 0 {
        format!(
            "{}/{}",
            human_bytes(j.done_bytes),
            human_bytes(j.total_bytes)
        )
    } else {
        "-".into()
    };
    vec![
        j.id.to_string(),
        j.kind.clone(),
        j.target.clone(),
        j.state.as_str().into(),
        progress,
        j.started_at.clone(),
        j.error.clone().unwrap_or_default(),
    ]
}

pub(super) fn print_env(v: &EnvironmentView, json: bool) {
    if json {
        print_json(v);
        return;
    }
    let e = &v.env;
    println!("name:       {}", e.name);
    println!("kind:       {}", e.kind.as_str());
    println!("state:      {}", e.state.as_str());
    if let Some(r) = &v.runstate {
        println!("qemu:       {r}");
    }
    if let Some(pid) = e.pid {
        println!("pid:        {pid}");
    }
    println!("qmp socket: {}", e.qmp_socket.display());
    if let Some(c) = &e.config {
        println!("memory:     {} MiB", c.memory_mib);
        println!("cpus:       {}", c.cpus);
        println!("accel:      {}", c.accel);
        if let Some(k) = &c.kernel {
            println!("kernel:     {}", k.display());
        }
        if let Some(i) = &c.initrd {
            println!("initrd:     {}", i.display());
        }
        if let Some(a) = &c.append {
            println!("append:     {a}");
        }
        for d in &c.disks {
            println!(
                "disk {}:   {} ({:?}{})",
                d.name,
                d.path.display(),
                d.format,
                if d.read_only { ", read-only" } else { "" }
            );
        }
    }
    if let Some(f) = &e.files {
        println!("serial log: {}", f.serial_log.display());
        println!("qemu log:   {}", f.qemu_log.display());
    }
    if let Some(x) = &e.last_exit {
        println!("last exit:  {x}");
    }
    println!("created:    {}", e.created_at);
    println!("updated:    {}", e.updated_at);
}

/// Prints a network setup: plan, active branch, host ports.
pub(super) fn print_net(setup: &NetSetup, json: bool) {
    if json {
        print_json(setup);
        return;
    }
    let p = &setup.plan;
    println!("env:    {}", setup.env);
    println!(
        "plan:   guest {}/{} via {}",
        p.guest_ip, p.guest_prefix, p.gateway
    );
    match &setup.active {
        Some(w) => println!("active: weave {w}"),
        None => println!("active: {} itself", setup.env),
    }
    println!("egress: {}", setup.egress.as_str());
    let rows = setup
        .ports
        .iter()
        .map(|port| {
            vec![
                port.host_port.to_string(),
                port.guest_port.to_string(),
                port.guest_ip
                    .map(|ip| ip.to_string())
                    .unwrap_or_else(|| "-".into()),
                if port.published {
                    "published"
                } else {
                    "weave route"
                }
                .into(),
                port.target.clone(),
            ]
        })
        .collect();
    print_table(
        &["HOST PORT", "GUEST PORT", "GUEST IP", "KIND", "GOES TO"],
        rows,
    );
}

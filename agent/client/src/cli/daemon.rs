//! `weft status` and `weft whoami`: what weftd says about itself and about the caller.

use super::output::print_json;
use super::CliError;
use crate::client::Client;
use weft_api::env::Status;

/// `weft status`
pub(super) async fn status(client: &Client, json: bool) -> Result<(), CliError> {
    let s: Status = client.get("/v1/status").await?;
    if json {
        print_json(&s);
    } else {
        println!(
            "weftd {} (pid {}), up {}",
            s.version,
            s.pid,
            humantime::format_duration(std::time::Duration::from_secs(s.uptime_secs))
        );
        println!("socket:       {}", s.socket.display());
        println!("data:         {}", s.data_dir.display());
        println!("environments: {} ({} running)", s.environments, s.running);
        println!("accel:        {} by default", s.default_accel);
        match &s.kvm_detail {
            None => println!("kvm:          usable"),
            Some(why) => println!("kvm:          not usable: {why}"),
        }
    }
    Ok(())
}

/// `weft whoami`
pub(super) async fn whoami(client: &Client, json: bool) -> Result<(), CliError> {
    let w: weft_api::roles::Whoami = client.get("/v1/whoami").await?;
    if json {
        print_json(&w);
    } else {
        match w.uid {
            Some(uid) if w.user != format!("uid {uid}") => {
                println!("user:   {} (uid {uid})", w.user)
            }
            _ => println!("user:   {}", w.user),
        }
        println!("groups: {}", w.groups.join(", "));
        println!(
            "role:   {}",
            w.role.map_or("none".to_string(), |r| r.to_string())
        );
        if w.actor != w.user {
            println!("actor:  {}", w.actor);
        }
    }
    Ok(())
}

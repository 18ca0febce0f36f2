//! Feeds arbitrary bytes, as a weave's guest could send them to port 67, to the DHCP
//! server's packet handling (`weft_netns::dhcp::answer`). It must never panic; whatever it
//! answers must be a well-formed reply that offers only the plan's address.
#![no_main]

use dhcproto::v4::{Message, MessageType, Opcode};
use dhcproto::{Decodable, Decoder};
use libfuzzer_sys::fuzz_target;
use weft_netns::dhcp::{answer, Lease, MAX_PACKET};

fuzz_target!(|data: &[u8]| {
    let lease = Lease::for_weaves();
    let Ok(a) = answer(data, &lease) else {
        return;
    };
    assert!(data.len() <= MAX_PACKET);
    let reply = Message::decode(&mut Decoder::new(&a.bytes)).expect("our answer decodes");
    assert_eq!(reply.opcode(), Opcode::BootReply);
    assert_eq!(reply.opts().msg_type(), Some(a.kind));
    match a.kind {
        MessageType::Offer | MessageType::Ack => assert_eq!(reply.yiaddr(), lease.address),
        MessageType::Nak => assert!(reply.yiaddr().is_unspecified()),
        other => panic!("answered with {other:?}"),
    }
    assert!(a.to == lease.address || a.to.is_broadcast());
});

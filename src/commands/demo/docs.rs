//! The demo documents, one collection's unit at a time, each drawn from its own generator
//! (`plan::doc_rng`) so that any document can be made alone, in any order.

use super::plan::{doc_rng, epoch_secs, hex, hex32, oid, sample, Fork, Kind, Plan};
use super::text::*;
use super::{Coll, END};
use bson::{oid::ObjectId, RawArrayBuf, RawBson, RawDocumentBuf};
use rand::{seq::SliceRandom, Rng};

impl Plan {
    pub(super) fn user_doc(&self, u: usize) -> RawDocumentBuf {
        let user = &self.users[u];
        let mut rng = doc_rng(self.seed, Coll::User, u);
        let first = *FIRST_NAMES.choose(&mut rng).unwrap();
        let last = *LAST_NAMES.choose(&mut rng).unwrap();
        let clean = format!("{}{}{u}", first.to_lowercase(), last.to_lowercase());
        let r: f64 = rng.gen();
        let user_name = if r < 0.03 {
            format!("  {clean} ")
        } else if r < 0.08 {
            format!("{first}{last}{u}")
        } else {
            clean.clone()
        };
        let mut d = RawDocumentBuf::new();
        d.append("_id", oid(user.created, &mut rng));
        d.append("id", hex(user.id));
        d.append("userName", user_name);
        d.append("fullName", format!("{first} {last}"));
        d.append(
            "email",
            format!("{clean}@{}", *MAIL_DOMAINS.choose(&mut rng).unwrap()),
        );
        d.append(
            "avatarUrl",
            format!(
                "https://avatars.githubusercontent.com/u/{}?v=4",
                rng.gen_range(1_000..90_000_000)
            ),
        );
        let created = epoch_secs(&mut rng, user.created);
        d.append("createdTimestamp", created);
        d
    }

    /// A documentInfo document; `dup` gives the `_id` and time of a second copy of viz `i`.
    pub(super) fn viz_doc(&self, i: usize, dup: Option<(ObjectId, i64)>) -> RawDocumentBuf {
        let v = &self.vizzes[i];
        let mut rng = doc_rng(self.seed, Coll::Info, i);
        let id = oid(v.created, &mut rng);
        let mut d = RawDocumentBuf::new();
        if v.kind == Kind::Leftover {
            d.append("_id", oid(v.updated, &mut rng));
            d.append("_type", RawBson::Null);
            d.append("lastUpdatedTimestamp", RawBson::Int64(v.updated));
            return d;
        }
        d.append("_id", dup.map_or(id, |(o, _)| o));
        d.append("id", hex(v.id));
        d.append("documentType", "viz");
        d.append("owner", hex(self.users[v.owner as usize].id));
        let title = title(&mut rng);
        if let Some(t) = title {
            d.append("title", t);
        }
        d.append("description", description(&mut rng));
        let created = epoch_secs(&mut rng, v.created);
        d.append("createdTimestamp", created);
        let updated_at = dup.map_or(v.updated, |(_, t)| t);
        let updated = if v.kind == Kind::MalformedTime {
            malformed_time(&mut rng, updated_at)
        } else {
            epoch_secs(&mut rng, updated_at)
        };
        d.append("lastUpdatedTimestamp", updated);
        match &v.fork {
            Fork::None => {}
            Fork::Parent(j) => d.append("forkedFrom", hex(self.vizzes[*j as usize].id)),
            Fork::Dangling(s) => d.append("forkedFrom", hex(*s)),
        }
        let n_users = self.users.len();
        let mut upvotes = RawArrayBuf::new();
        let k = if rng.gen_bool(0.55) {
            0
        } else {
            rng.gen_range(1..=12)
        };
        for u in sample(&mut rng, n_users, k) {
            let mut up = RawDocumentBuf::new();
            up.append("userId", hex(self.users[u].id));
            let t = rng.gen_range(v.created..=END);
            up.append("timestamp", epoch_secs(&mut rng, t));
            upvotes.push(up);
        }
        d.append("upvotes", upvotes);
        let mut collaborators = RawArrayBuf::new();
        let k = if rng.gen_bool(0.8) {
            0
        } else {
            rng.gen_range(1..=3)
        };
        for u in sample(&mut rng, n_users, k) {
            let mut co = RawDocumentBuf::new();
            co.append("userId", hex(self.users[u].id));
            collaborators.push(co);
        }
        d.append("collaborators", collaborators);
        d.append(
            "privacy",
            if rng.gen_bool(0.9) {
                "public"
            } else {
                "private"
            },
        );
        let views = (rng.gen::<f64>().powi(6) * 250_000.0) as i32;
        d.append("viewCount", views);
        let age_hours = ((END - v.updated) as f64 / 3600.0).max(0.0);
        d.append(
            "scoreHackerHot",
            f64::from(views) / (age_hours + 2.0).powf(1.8) + rng.gen::<f64>() * 1e-3,
        );
        d
    }

    pub(super) fn content_doc(&self, i: usize) -> RawDocumentBuf {
        let v = &self.vizzes[i];
        let mut rng = doc_rng(self.seed, Coll::Content, i);
        let mut d = RawDocumentBuf::new();
        d.append("_id", oid(v.created, &mut rng));
        d.append("id", hex(v.id));
        let mut files = RawArrayBuf::new();
        let mut file = |name: &str, text: String| {
            let mut f = RawDocumentBuf::new();
            f.append("name", name);
            f.append("text", text);
            files.push(f);
        };
        file("index.html", html(&mut rng));
        if rng.gen_bool(0.8) {
            file("index.js", javascript(&mut rng, 4..40));
        }
        if rng.gen_bool(0.5) {
            file("README.md", readme(&mut rng));
        }
        if rng.gen_bool(0.2) {
            file("styles.css", css(&mut rng));
        }
        if rng.gen_bool(0.15) {
            file(
                ["data.csv", "data.json", "utils.js"]
                    .choose(&mut rng)
                    .unwrap(),
                javascript(&mut rng, 2..12),
            );
        }
        if v.oversized {
            file("data.csv", big_csv(&mut rng, 1 << 20));
        }
        d.append("files", files);
        let t = epoch_secs(&mut rng, v.updated);
        d.append("lastUpdatedTimestamp", t);
        d
    }

    pub(super) fn commit_docs(&self, i: usize, out: &mut Vec<RawDocumentBuf>) {
        let v = &self.vizzes[i];
        let mut rng = doc_rng(self.seed, Coll::Commits, i);
        let k = rng.gen_range(1..=4usize);
        let (from, to) = (v.created * 1000, v.updated * 1000 + 999);
        let mut times: Vec<i64> = (0..k).map(|_| rng.gen_range(from..=to)).collect();
        times.sort_unstable();
        times[0] = from + rng.gen_range(0..1000);
        times.sort_unstable();
        let mut parent: Option<String> = None;
        for (n, t) in times.into_iter().enumerate() {
            let id = hex32(&mut rng);
            let mut d = RawDocumentBuf::new();
            d.append("_id", oid(t / 1000, &mut rng));
            d.append("id", id.as_str());
            d.append("vizId", hex(v.id));
            if let Some(p) = &parent {
                d.append("parentCommitId", p.as_str());
            }
            let author = if rng.gen_bool(0.85) {
                v.owner as usize
            } else {
                rng.gen_range(0..self.users.len())
            };
            d.append("authorId", hex(self.users[author].id));
            d.append("timestamp", RawBson::Int64(t));
            let message = match (n, &v.fork) {
                (0, Fork::None) => "Initial commit".to_owned(),
                (0, _) => "Forked".to_owned(),
                _ => format!(
                    "{} {}",
                    COMMIT_VERBS.choose(&mut rng).unwrap(),
                    COMMIT_OBJECTS.choose(&mut rng).unwrap()
                ),
            };
            d.append("message", message);
            out.push(d);
            parent = Some(id);
        }
    }

    pub(super) fn event_docs(&self, i: usize, out: &mut Vec<RawDocumentBuf>) {
        let v = &self.vizzes[i];
        let mut rng = doc_rng(self.seed, Coll::Events, i);
        for _ in 0..rng.gen_range(0..=5) {
            let t = rng.gen_range(v.created * 1000..=END * 1000);
            let mut d = RawDocumentBuf::new();
            d.append("_id", oid(t / 1000, &mut rng));
            d.append("id", hex32(&mut rng));
            d.append("vizId", hex(v.id));
            let r: f64 = rng.gen();
            let event = if r < 0.8 {
                "view"
            } else if r < 0.92 {
                "upvote"
            } else {
                "fork"
            };
            // Anonymous views carry no user.
            if event != "view" || rng.gen_bool(0.6) {
                d.append(
                    "userId",
                    hex(self.users[rng.gen_range(0..self.users.len())].id),
                );
            }
            d.append("eventType", event);
            d.append("timestamp", bson::DateTime::from_millis(t));
            out.push(d);
        }
    }
}

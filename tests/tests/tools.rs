//! Everyday shell tools on the mount: cp -a, diff, mv, ln, find, tar and git.
//!
//! Trees are built on the local filesystem, copied in and out, and compared with the originals
//! by content, type, mode, link count, owner and modification time.

use cairn_tests::*;
use std::path::Path;

/// Builds a tree with every kind of entry the tools have to carry: text and binary files, an
/// empty file, an executable, names with spaces, a symlink, hard links, an empty directory,
/// a fifo and a file with a hole, with fixed modification times.
fn make_tree(dir: &Path, name: &str) {
    sh(
        dir,
        &format!(
            r#"
            mkdir -p {name}/sub/deeper {name}/emptydir {name}/"dir with spaces"
            cd {name}
            printf 'hello\nworld\n' > a.txt
            head -c 3000000 /dev/urandom > bin.dat
            head -c 70000 /dev/urandom > sub/deeper/"file with spaces.txt"
            : > empty
            printf '#!/bin/sh\necho hi\n' > sub/exec.sh && chmod 755 sub/exec.sh
            chmod 640 a.txt
            echo spaced > "dir with spaces/x y"
            ln -s a.txt link
            ln -s ../../a.txt sub/deeper/uplink
            ln -s missing dangling
            ln a.txt sub/hard
            mkfifo sub/fifo
            truncate -s 5M sparse && printf 'tail' >> sparse
            touch -h -d '2001-02-03 04:05:06.123456789' a.txt link bin.dat sub/exec.sh sparse
            touch -d '1999-12-31 23:59:59' sub/deeper emptydir
            "#
        ),
    );
}

/// One line per entry: path, type, mode, size (not of directories, which filesystems count
/// differently), link count, owner, mtime (ns) and link target.
fn listing(dir: &Path) -> String {
    sh(
        dir,
        r"find . -mindepth 1 \( -type d -printf '%P|%y|%m|-|%n|%U:%G|%T@|\n' \) \
          -o -printf '%P|%y|%m|%s|%n|%U:%G|%T@|%l\n' | LC_ALL=C sort",
    )
}

/// Like [`listing`] without link counts and directory mtimes (which change when entries move).
fn shape(dir: &Path) -> String {
    sh(dir, r"find . -mindepth 1 \( -type d -printf '%P|%y|%m|%l\n' \) -o -printf '%P|%y|%m|%s|%l\n' | LC_ALL=C sort")
}

fn sums(dir: &Path) -> String {
    sh(dir, "find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum")
}

#[test]
fn cp_diff_mv_ln_find() {
    let c = Cluster::start(3);
    let local = tempfile::Builder::new().prefix("cairn-ref-").tempdir().unwrap();
    let l = local.path();
    make_tree(l, "src");
    let want = listing(&l.join("src"));
    assert!(want.contains("sub/hard|f|640|12|2|"), "hard link in the source tree:\n{want}");

    // cp -a in, compare, and back out.
    let mnt = c.mnt.display().to_string();
    sh(l, &format!("cp -a src '{mnt}/copy' && diff -r --no-dereference --exclude=fifo src '{mnt}/copy'"));
    assert_eq!(listing(&c.path("copy")), want, "cp -a into the mount");
    sh(l, &format!("cp -a '{mnt}/copy' back && diff -r --no-dereference --exclude=fifo src back"));
    assert_eq!(listing(&l.join("back")), want, "cp -a out of the mount");
    // A second copy inside the mount.
    sh(&c.mnt, "cp -a copy copy2 && diff -r --no-dereference --exclude=fifo copy copy2");
    assert_eq!(listing(&c.path("copy2")), want, "cp -a within the mount");
    // diff notices a change.
    sh(&c.mnt, "echo changed >> copy2/sub/deeper/'file with spaces.txt'");
    let out = std::process::Command::new("diff")
        .args(["-rq", "--no-dereference", "--exclude=fifo"])
        .arg(c.path("copy"))
        .arg(c.path("copy2"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "diff must report the change");
    assert!(String::from_utf8_lossy(&out.stdout).contains("file with spaces.txt"));

    // mv: rename within a directory, across directories, a whole directory, and in from
    // another filesystem (copy and delete).
    let before = shape(&c.path("copy"));
    sh(
        &c.mnt,
        r#"
        mv copy/a.txt copy/renamed.txt
        mv copy/renamed.txt copy/sub/deeper/
        mv copy/sub copy/emptydir/
        mv copy/emptydir/sub/deeper/renamed.txt copy/a.txt
        mv copy/emptydir/sub copy/sub
        test ! -e copy/emptydir/sub
        "#,
    );
    assert_eq!(shape(&c.path("copy")), before, "mv there and back");
    sh(l, &format!("printf outside > outside.txt && mv outside.txt '{mnt}/copy/' && test ! -e outside.txt"));
    assert_eq!(std::fs::read(c.path("copy/outside.txt")).unwrap(), b"outside");
    sh(l, &format!("mv '{mnt}/copy2' moved-out"));
    assert!(!c.path("copy2").exists(), "mv out of the mount removes the source");
    assert!(l.join("moved-out/sub/deeper/file with spaces.txt").exists());

    // ln: hard and symbolic links, replacing with -f, refusing an existing name.
    sh(
        &c.mnt,
        r#"
        cd copy
        ln a.txt hard2
        test "$(stat -c %h a.txt)" = 3
        test "$(stat -c %i a.txt)" = "$(stat -c %i hard2)"
        ln -s sub/exec.sh run
        test "$(readlink run)" = sub/exec.sh
        test "$(./run)" = hi
        ln -sf a.txt run
        test "$(readlink run)" = a.txt
        ! ln a.txt hard2 2>/dev/null
        rm hard2
        test "$(stat -c %h a.txt)" = 2
        ln -sr sub/exec.sh sub/deeper/rel
        test "$(readlink sub/deeper/rel)" = ../exec.sh
        test "$(sub/deeper/rel)" = hi
        rm run sub/deeper/rel
        "#,
    );

    // find with tests and actions.
    let found = sh(
        &c.path("copy"),
        r#"
        echo "files: $(find . -type f | LC_ALL=C sort | tr '\n' ' ')"
        echo "links: $(find . -type l | LC_ALL=C sort | tr '\n' ' ')"
        echo "empty: $(find . -empty | LC_ALL=C sort | tr '\n' ' ')"
        echo "exec: $(find . -type f -perm -u+x | tr '\n' ' ')"
        echo "txt: $(find . -name '*.txt' | LC_ALL=C sort | tr '\n' ' ')"
        echo "samefile: $(find . -samefile a.txt | LC_ALL=C sort | tr '\n' ' ')"
        echo "old: $(find . -maxdepth 1 -type f ! -newermt 2002-01-01 | LC_ALL=C sort | tr '\n' ' ')"
        echo "big: $(find . -size +1M | LC_ALL=C sort | tr '\n' ' ')"
        echo "pipes: $(find . -type p)"
        find . -name '*.sh' -exec sh {} \;
        find . -depth -name emptydir -delete
        test ! -e emptydir
        "#,
    );
    let expected = "files: ./a.txt ./bin.dat ./dir with spaces/x y ./empty ./outside.txt ./sparse ./sub/deeper/file with spaces.txt ./sub/exec.sh ./sub/hard \n\
        links: ./dangling ./link ./sub/deeper/uplink \n\
        empty: ./empty ./emptydir \n\
        exec: ./sub/exec.sh \n\
        txt: ./a.txt ./outside.txt ./sub/deeper/file with spaces.txt \n\
        samefile: ./a.txt ./sub/hard \n\
        old: ./a.txt ./bin.dat ./sparse \n\
        big: ./bin.dat ./sparse \n\
        pipes: ./sub/fifo\n\
        hi\n";
    assert_eq!(found, expected);
}

#[test]
fn tar_round_trip() {
    let c = Cluster::start(3);
    let local = tempfile::Builder::new().prefix("cairn-ref-").tempdir().unwrap();
    let l = local.path();
    make_tree(l, "src");
    // Some larger files of odd sizes, crossing Cairn's 1 MiB block size.
    sh(
        l,
        "head -c 9437185 /dev/urandom > src/nine.bin && head -c 4194304 /dev/urandom > src/four.bin \
         && head -c 4194305 /dev/urandom > src/sub/four-plus.bin && tar --format=posix -C src -cf src.tar .",
    );
    let want_sums = sums(&l.join("src"));
    let want = listing(&l.join("src"));
    let mnt = c.mnt.display().to_string();

    // Extract into the mount; compare checksums, metadata and tar's own verdict.
    sh(l, &format!("mkdir '{mnt}/x' && tar -C '{mnt}/x' -xpf src.tar && tar -C '{mnt}/x' --compare -f src.tar"));
    assert_eq!(sums(&c.path("x")), want_sums, "checksums after extracting into the mount");
    assert_eq!(listing(&c.path("x")), want, "metadata after extracting into the mount");

    // Archive on the mount, compressed, then extract back out.
    sh(
        l,
        &format!(
            "tar --format=posix -C '{mnt}/x' -czf '{mnt}/again.tgz' . && mkdir y && tar -C y -xpzf '{mnt}/again.tgz'"
        ),
    );
    assert_eq!(sums(&l.join("y")), want_sums, "checksums after a round trip");
    assert_eq!(listing(&l.join("y")), want, "metadata after a round trip");
    // Archive and extract both on the mount, through a pipe.
    sh(&c.mnt, "mkdir z && tar --format=posix -C x -cf - . | tar -C z -xpf -");
    assert_eq!(sums(&c.path("z")), want_sums, "checksums of a copy made by tar within the mount");
    assert_eq!(listing(&c.path("z")), want);
    // sha256sum -c reads every file back.
    sh(
        l,
        &format!(
            "cd src && find . -type f -print0 | xargs -0 sha256sum > ../SUMS && cd '{mnt}/z' && sha256sum --quiet -c {}/SUMS",
            l.display()
        ),
    );
}

#[test]
fn git_on_the_mount() {
    let c = Cluster::start(3);
    let home = tempfile::Builder::new().prefix("cairn-ref-").tempdir().unwrap();
    let env = format!(
        "export HOME='{}' GIT_CONFIG_NOSYSTEM=1 GIT_AUTHOR_NAME=T GIT_AUTHOR_EMAIL=t@example.com \
         GIT_COMMITTER_NAME=T GIT_COMMITTER_EMAIL=t@example.com GIT_AUTHOR_DATE='2020-01-01T00:00:00Z' \
         GIT_COMMITTER_DATE='2020-01-01T00:00:00Z'",
        home.path().display()
    );
    let script = format!(
        r#"
        {env}
        git init -q -b main repo
        cd repo
        mkdir -p src docs
        for i in $(seq 1 40); do echo "line $i" > src/f$i.txt; done
        head -c 2000000 /dev/urandom > docs/blob.bin
        printf '#!/bin/sh\necho run\n' > run.sh && chmod +x run.sh
        git add -A
        git commit -q -m first
        sed -i 's/line/LINE/' src/f1*.txt
        git rm -q src/f40.txt
        git mv src/f39.txt docs/moved.txt
        git commit -q -am second
        git checkout -q -b topic
        echo topic > topic.txt && git add topic.txt && git commit -q -m third
        git checkout -q main
        git merge -q --no-edit topic
        git status --porcelain
        git log --format=%s
        git fsck --full --strict 2>&1
        git gc -q
        git fsck --full 2>&1
        git count-objects -v | grep -E '^(count|in-pack):'
        git show --stat --format=%s HEAD~1 | tail -1
        git diff HEAD~2 --stat | tail -1
        git ls-files | wc -l
        test -x run.sh && ./run.sh
        "#
    );
    // The same script on the local disk is the reference.
    let want = sh(home.path(), &script);
    assert!(want.starts_with("third\nsecond\nfirst\n"), "reference git output:\n{want}");
    let out = sh(&c.mnt, &script);
    assert_eq!(out, want, "git on the mount");
    // A clone to the local disk has the same tree.
    let mnt = c.mnt.display().to_string();
    sh(
        home.path(),
        &format!(
            "{env}; git clone -q '{mnt}/repo' clone && diff -r --exclude=.git clone '{mnt}/repo' \
             && test \"$(git -C clone rev-parse HEAD)\" = \"$(git -C '{mnt}/repo' rev-parse HEAD)\""
        ),
    );
}

#[test]
fn cairn_bench_measures_a_mount_beside_a_local_directory() {
    let c = Cluster::start(1);
    let local = c.tmp.path().join("local");
    std::fs::create_dir(&local).unwrap();
    let out = run(std::process::Command::new(bin("cairn"))
        .args(["bench", "--size-mib", "4", "--files", "20", "--json"])
        .arg(&c.mnt)
        .arg("--against")
        .arg(&local));
    let mut seen = std::collections::BTreeMap::new();
    for line in out.lines() {
        let field = |k: &str| line.split(&format!("\"{k}\":")).nth(1).map(|r| r.split([',', '}']).next().unwrap());
        let target = field("target").unwrap_or_else(|| panic!("no target in {line}"));
        let value: f64 = field("value").unwrap().parse().unwrap();
        assert!(value > 0.0, "a measurement of nothing: {line}");
        *seen.entry(target.to_string()).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "not one set of measurements per directory:\n{out}");
    assert!(seen.values().all(|n| *n == 10), "measurements missing:\n{out}");
    for dir in [&c.mnt, &local] {
        let left: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.iter().all(|n| !n.to_string_lossy().starts_with(".cairn-bench")), "left behind: {left:?}");
    }
    // A directory that is not there is an error that names it.
    let bad = std::process::Command::new(bin("cairn")).args(["bench", "/nonexistent/dir"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent/dir"), "{bad:?}");
}

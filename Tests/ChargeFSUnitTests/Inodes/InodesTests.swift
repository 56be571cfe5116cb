import XCTest
@testable import ChargeFS

/// Directory: stable cookies, tombstones and compaction, replace keeping the cookie.
final class DirectoryTests: XCTestCase {
    func name(_ i: Int) -> FileName { Array("n\(i)".utf8) }

    func listed(_ d: Directory, from cookie: UInt64 = 0) -> [(FileName, InodeNumber, UInt64)] {
        var out: [(FileName, InodeNumber, UInt64)] = []
        d.forEach(from: cookie) { out.append(($0.name, $0.ino, $0.cookie)); return true }
        return out
    }

    func testCookiesSurviveRemovalsAndCompaction() {
        let d = Directory(parent: 1)
        for i in 0..<200 { d.insert(name(i), ino: InodeNumber(rawValue: UInt64(100 + i))) }
        let cookieOf150 = listed(d).first { $0.0 == name(150) }?.2
        // Enough removals to compact (more than 32 tombstones and more than the live entries).
        for i in 0..<120 { d.remove(name(i)) }
        XCTAssertEqual(listed(d).count, 80)
        XCTAssertEqual(listed(d).first { $0.0 == name(150) }?.2, cookieOf150, "a remaining entry keeps its cookie")
        // Resuming after an entry lists exactly the ones after it, once.
        guard let cookie = cookieOf150 else { return XCTFail("entry 150 missing") }
        XCTAssertEqual(listed(d, from: cookie + 1).map { $0.0 }, (151..<200).map(name))
        XCTAssertNil(d.lookup(name(3)))
        XCTAssertEqual(d.lookup(name(199)), 299)
        XCTAssertFalse(d.isEmpty)
    }

    func testReplaceKeepsCookieAndInsertAppends() {
        let d = Directory(parent: 1)
        d.insert(name(1), ino: 10)
        d.insert(name(2), ino: 20)
        let before = listed(d)
        d.replace(name(1), ino: 11)
        XCTAssertEqual(listed(d).map { $0.2 }, before.map { $0.2 })
        XCTAssertEqual(d.lookup(name(1)), 11)
        d.replace(name(3), ino: 30)  // a new name: inserted at the end
        XCTAssertEqual(listed(d).last?.0, name(3))
        XCTAssertGreaterThan(listed(d).last?.2 ?? 0, before.last?.2 ?? .max)
        for i in 1...3 { d.remove(name(i)) }
        XCTAssertTrue(d.isEmpty)
        XCTAssertTrue(listed(d).isEmpty)
    }
}

/// InodeTable: numbers reused with a new generation; lookups by number.
final class InodeTableTests: XCTestCase {
    func make(_ table: inout InodeTable) -> Inode {
        table.insert { Inode(ino: $0, mode: ModeBits.regular | 0o644, uid: 0, gid: 0, now: .now) }
    }

    func testReuseBumpsGeneration() {
        var table = InodeTable()
        let a = make(&table), b = make(&table)
        XCTAssertEqual([a.ino, b.ino], [1, 2], "0 is never an inode")
        XCTAssertEqual(table.count, 2)
        XCTAssertTrue(table[a.ino] === a)
        XCTAssertNil(table[0])
        XCTAssertNil(table[99])
        table.remove(a.ino)
        XCTAssertNil(table[a.ino])
        table.remove(a.ino)  // twice: nothing happens
        XCTAssertEqual(table.count, 1)
        let c = make(&table)
        XCTAssertEqual(c.ino, a.ino, "the freed number is reused")
        XCTAssertEqual(c.generation, a.generation + 1, "with a new generation")
        XCTAssertEqual(Set(table.all.map(\.ino)), [b.ino, c.ino])
        table.removeAll()
        XCTAssertEqual(table.count, 0)
        XCTAssertEqual(make(&table).ino, 1)
    }
}

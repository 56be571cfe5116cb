import Foundation

/// What the plugin knows about one published volume, kept as one JSON file per volume under
/// --state-dir so that a restarted (or upgraded) plugin finds the volumes its predecessor
/// published and can unpublish them: the chargefsd daemons outlive the plugin.
struct VolumeRecord: Codable, Equatable, Sendable {
    var volumeID: String
    var targetPath: String
    var podUID: String
    var podCgroup: String
    var attributes: VolumeAttributes
    var readOnly: Bool
    var publishedAt: String
}

struct StateStore: Sendable {
    let dir: String
    /// unlink(2), or a stand-in that fails (the unit tests inject failures here): 0 or an errno.
    private let unlinkFile: @Sendable (String) -> Int32

    init(dir: String, unlinkFile: @escaping @Sendable (String) -> Int32 = { unlink($0) == 0 ? 0 : errno }) throws(CSIError) {
        self.dir = dir
        self.unlinkFile = unlinkFile
        do {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
        } catch {
            throw CSIError(.internal, "cannot create state directory \(dir): \(error.localizedDescription)")
        }
    }

    /// A file name for a volume id that no id can turn into a path: hex of its UTF-8 bytes
    /// (a kubelet id, "csi-" and 64 hex digits, gives 136), long ids cut and suffixed with a
    /// stable hash (FNV-1a; Swift's hashValue changes from one run to the next).
    private func file(for volumeID: String) -> String {
        let hex = volumeID.utf8.map { b in (b < 16 ? "0" : "") + String(b, radix: 16) }.joined()
        if hex.count <= 200 { return dir + "/" + hex + ".json" }
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in volumeID.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        return dir + "/" + String(hex.prefix(200)) + "-" + String(h, radix: 16) + ".json"
    }

    func save(_ r: VolumeRecord) throws(CSIError) {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        do {
            let data = try enc.encode(r)
            // write to a temp file and rename, so a killed plugin never leaves half a record
            try data.write(to: URL(fileURLWithPath: file(for: r.volumeID)), options: .atomic)
        } catch {
            throw CSIError(.internal, "cannot save state of volume \(r.volumeID) in \(dir): \(error.localizedDescription)")
        }
    }

    /// Removes a volume's record; one already gone is removed. INTERNAL when the file stays: a
    /// restarted plugin would load it as a published volume.
    func remove(_ volumeID: String) throws(CSIError) {
        let path = file(for: volumeID)
        let err = unlinkFile(path)
        guard err == 0 || err == ENOENT else {
            throw CSIError(.internal, "cannot remove the state of volume \(volumeID) (\(path)): \(String(cString: strerror(err)))")
        }
    }

    /// Every record; unreadable files are reported and left alone.
    func loadAll(log: (String) -> Void) -> [VolumeRecord] {
        let names: [String]
        do {
            names = try FileManager.default.contentsOfDirectory(atPath: dir)
        } catch {
            log("state: cannot list \(dir): \(error.localizedDescription); no volume of a previous instance is known")
            return []
        }
        var out: [VolumeRecord] = []
        for n in names.sorted() where n.hasSuffix(".json") {
            let p = dir + "/" + n
            guard let data = FileManager.default.contents(atPath: p),
                  let r = try? JSONDecoder().decode(VolumeRecord.self, from: data) else {
                log("state: cannot read \(p); ignored")
                continue
            }
            out.append(r)
        }
        return out
    }
}

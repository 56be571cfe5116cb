// Kubernetes resource quantities ("64Mi", "1Gi", "500M", "1.5G", "1e9", "123"), as a pod spec
// writes a volume's size, turned into a byte count. Integer arithmetic only, so that "1Ei" or
// "9223372036854775807" come out exact; fractions of a byte round up as Kubernetes' Value() does.
enum Quantity {
    /// Bytes for a quantity string, or nil when it is not a valid non-negative quantity or does
    /// not fit in an Int64.
    static func bytes(_ text: String) -> Int64? {
        var s = Substring(text)
        if s.hasPrefix("+") { s = s.dropFirst() }
        // Split number and suffix: the number is digits with at most one '.'.
        var intDigits = Substring("")
        var fracDigits = Substring("")
        var i = s.startIndex
        while i < s.endIndex, s[i].isASCII, s[i].isNumber { i = s.index(after: i) }
        intDigits = s[s.startIndex..<i]
        if i < s.endIndex, s[i] == "." {
            let f0 = s.index(after: i)
            var j = f0
            while j < s.endIndex, s[j].isASCII, s[j].isNumber { j = s.index(after: j) }
            fracDigits = s[f0..<j]
            i = j
        }
        if intDigits.isEmpty && fracDigits.isEmpty { return nil }
        let suffix = String(s[i...])

        // The multiplier as (numerator, divisor): binary and decimal SI suffixes, or an exponent.
        var multiplier: Int64 = 1
        var divisor: Int64 = 1
        switch suffix {
        case "": break
        case "Ki": multiplier = 1 << 10
        case "Mi": multiplier = 1 << 20
        case "Gi": multiplier = 1 << 30
        case "Ti": multiplier = 1 << 40
        case "Pi": multiplier = 1 << 50
        case "Ei": multiplier = 1 << 60
        case "n": divisor = 1_000_000_000
        case "u": divisor = 1_000_000
        case "m": divisor = 1_000
        case "k": multiplier = 1_000
        case "M": multiplier = 1_000_000
        case "G": multiplier = 1_000_000_000
        case "T": multiplier = 1_000_000_000_000
        case "P": multiplier = 1_000_000_000_000_000
        case "E": multiplier = 1_000_000_000_000_000_000
        default:
            // Decimal exponent: e3, E-2, e+6.
            guard let first = suffix.first, first == "e" || first == "E" else { return nil }
            var exp = suffix.dropFirst()
            var negative = false
            if exp.hasPrefix("-") { negative = true; exp = exp.dropFirst() }
            else if exp.hasPrefix("+") { exp = exp.dropFirst() }
            guard !exp.isEmpty, exp.allSatisfy({ $0.isASCII && $0.isNumber }),
                  exp.count <= 2, let e = Int(exp), e <= 18 else { return nil }
            let p = pow10(e)
            if negative { divisor = p } else { multiplier = p }
        }

        // value = (int.frac) * multiplier / divisor, rounded up.
        let digits = (intDigits + fracDigits).drop(while: { $0 == "0" })
        guard digits.count <= 18 else { return nil }  // keeps the mantissa in an Int64
        let mantissa = digits.isEmpty ? Int64(0) : Int64(String(digits)) ?? -1
        guard mantissa >= 0, fracDigits.count <= 18 else { return nil }
        let fracScale = pow10(fracDigits.count)

        // mantissa * multiplier / (fracScale * divisor), exact in 128 bits.
        let (hi, lo) = mantissa.multipliedFullWidth(by: multiplier)
        let (den, denOverflow) = fracScale.multipliedReportingOverflow(by: divisor)
        if denOverflow { return nil }
        // The quotient fits in an Int64 when hi:lo < den * 2^63 (hi < 2^62: both factors < 2^63).
        guard den > 0, (UInt64(hi) << 1) | (lo >> 63) < UInt64(den) else { return nil }
        let (q, r) = den.dividingFullWidth((high: hi, low: lo))
        if r == 0 { return q }
        return q == Int64.max ? nil : q + 1
    }

    private static func pow10(_ n: Int) -> Int64 {
        var v: Int64 = 1
        for _ in 0..<n { v *= 10 }
        return v
    }
}

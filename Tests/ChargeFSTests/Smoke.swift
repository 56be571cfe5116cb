import XCTest
@testable import ChargeFS
final class SmokeTests: XCTestCase { func testNothing() {} }

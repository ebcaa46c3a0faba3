//! The CMOS real-time clock (a Motorola MC146818 as in every PC) at ports 0x70 (index) and 0x71
//! (data): the host's time (UTC), in BCD or binary and in 12- or 24-hour form as the guest sets
//! register B, the status registers and 128 bytes of CMOS RAM.
//!
//! Guests read the wall clock here when they have no paravirtual clock, and some poll the
//! update-in-progress bit of register A until it drops: a port with no device reads 0xff, which
//! leaves that bit set for ever. Here the time is computed at each read, so no update cycle is
//! ever in progress and the bit always reads 0. The guest may set the clock (an offset from the
//! host's time is kept, the host's clock is never touched). Periodic, alarm and update
//! interrupts are not raised (register C always reads 0).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::devices::bus::BusDevice;

/// The index port (0x70) and the data port (0x71).
pub const CMOS_BASE: u64 = 0x70;
pub const CMOS_LEN: u64 = 2;

const INDEX_OFFSET: u64 = 0;
const DATA_OFFSET: u64 = 1;

/// Bit 7 of a write to the index port masks NMIs; it is not part of the index.
const INDEX_NMI_MASK: u8 = 0x80;
const RAM_SIZE: usize = 128;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
/// The century, where IBM PCs and ACPI's FADT (`century`) put it.
const REG_CENTURY: u8 = 0x32;

/// Register A: update in progress (read-only).
const A_UIP: u8 = 0x80;
/// Register A's power-on value: 32.768 kHz time base, 1024 Hz periodic rate.
const A_DEFAULT: u8 = 0x26;
/// Register B: updates stopped so the guest can set the time.
const B_SET: u8 = 0x80;
/// Register B: data in binary (else BCD).
const B_BINARY: u8 = 0x04;
/// Register B: hours 0-23 (else 1-12 with bit 7 for PM).
const B_24H: u8 = 0x02;
/// Register B's power-on value: BCD, 24-hour.
const B_DEFAULT: u8 = B_24H;
/// Register D: the RAM and time are valid (battery good).
const D_VALID: u8 = 0x80;
const HOUR_PM: u8 = 0x80;

/// A calendar time, as the clock registers show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (month 1-12).
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let month = i64::from(month);
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12; // March = 0
    let day_of_year = (153 * month_index + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day number (days since 1970-01-01): (year, month 1-12, day 1-31).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // month is 1..=12 and day 1..=31 by construction.
    (year, month as u8, day as u8)
}

impl DateTime {
    fn from_unix(seconds: i64) -> Self {
        let days = seconds.div_euclid(86_400);
        let of_day = seconds.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: (of_day / 3600) as u8,
            minute: (of_day / 60 % 60) as u8,
            second: (of_day % 60) as u8,
        }
    }

    /// Seconds since the epoch; out-of-range fields (a guest may write anything) are clamped.
    fn to_unix(self) -> i64 {
        let days = days_from_civil(self.year, self.month.clamp(1, 12), self.day.clamp(1, 31));
        days * 86_400
            + i64::from(self.hour.min(23)) * 3600
            + i64::from(self.minute.min(59)) * 60
            + i64::from(self.second.min(59))
    }

    /// 1 (Sunday) to 7 (Saturday).
    fn weekday(self) -> u8 {
        // 1970-01-01 was a Thursday.
        let days = days_from_civil(self.year, self.month.clamp(1, 12), self.day.clamp(1, 31));
        ((days + 4).rem_euclid(7) + 1) as u8
    }
}

fn to_bcd(value: u8) -> u8 {
    ((value / 10) << 4) | (value % 10)
}

fn from_bcd(value: u8) -> u8 {
    (value >> 4) * 10 + (value & 0x0f)
}

/// The host's wall clock, in seconds since the epoch.
fn host_now() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

pub struct Cmos {
    index: u8,
    ram: [u8; RAM_SIZE],
    /// The guest's clock minus the host's, in seconds (0 until the guest sets the clock).
    offset: i64,
    /// The time held while register B's SET bit stops the clock.
    held: Option<DateTime>,
    clock: fn() -> i64,
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

impl Cmos {
    /// A clock showing the host's time.
    pub fn new() -> Self {
        Self::with_clock(host_now)
    }

    /// A clock reading the time from `clock` (seconds since the epoch).
    fn with_clock(clock: fn() -> i64) -> Self {
        let mut ram = [0u8; RAM_SIZE];
        ram[usize::from(REG_A)] = A_DEFAULT;
        ram[usize::from(REG_B)] = B_DEFAULT;
        Self {
            index: 0,
            ram,
            offset: 0,
            held: None,
            clock,
        }
    }

    fn control(&self) -> u8 {
        self.ram[usize::from(REG_B)]
    }

    fn now(&self) -> DateTime {
        self.held
            .unwrap_or_else(|| DateTime::from_unix((self.clock)().saturating_add(self.offset)))
    }

    /// A clock field in the guest's chosen encoding.
    fn encode(&self, value: u8) -> u8 {
        if self.control() & B_BINARY != 0 {
            value
        } else {
            to_bcd(value)
        }
    }

    fn decode(&self, value: u8) -> u8 {
        if self.control() & B_BINARY != 0 {
            value
        } else {
            from_bcd(value)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.control() & B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        let twelve = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(twelve) | pm
    }

    fn decode_hour(&self, value: u8) -> u8 {
        if self.control() & B_24H != 0 {
            return self.decode(value);
        }
        let twelve = self.decode(value & !HOUR_PM) % 12;
        if value & HOUR_PM != 0 {
            twelve + 12
        } else {
            twelve
        }
    }

    fn read_register(&self, index: u8) -> u8 {
        let now = self.now();
        match index {
            REG_SECONDS => self.encode(now.second),
            REG_MINUTES => self.encode(now.minute),
            REG_HOURS => self.encode_hour(now.hour),
            REG_WEEKDAY => self.encode(now.weekday()),
            REG_DAY => self.encode(now.day),
            REG_MONTH => self.encode(now.month),
            REG_YEAR => self.encode(now.year.rem_euclid(100) as u8),
            REG_CENTURY => self.encode(now.year.div_euclid(100).clamp(0, 99) as u8),
            REG_A => self.ram[usize::from(REG_A)] & !A_UIP,
            REG_C => 0,
            REG_D => D_VALID,
            other => self.ram[usize::from(other)],
        }
    }

    /// Sets one field of the clock: held while SET is on, else at once.
    fn set_field(&mut self, index: u8, value: u8) {
        let mut time = self.now();
        let decoded = self.decode(value);
        match index {
            REG_SECONDS => time.second = decoded,
            REG_MINUTES => time.minute = decoded,
            REG_HOURS => time.hour = self.decode_hour(value),
            REG_DAY => time.day = decoded,
            REG_MONTH => time.month = decoded,
            REG_YEAR => time.year = time.year.div_euclid(100) * 100 + i64::from(decoded % 100),
            REG_CENTURY => time.year = i64::from(decoded) * 100 + time.year.rem_euclid(100),
            _ => return,
        }
        if self.held.is_some() {
            self.held = Some(time);
        } else {
            self.offset = time.to_unix() - (self.clock)();
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        match index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY | REG_MONTH | REG_YEAR
            | REG_CENTURY => self.set_field(index, value),
            // The weekday follows from the date.
            REG_WEEKDAY => {}
            REG_A => self.ram[usize::from(REG_A)] = value & !A_UIP,
            REG_B => {
                let was_set = self.control() & B_SET != 0;
                let now_set = value & B_SET != 0;
                if !was_set && now_set {
                    self.held = Some(self.now());
                }
                if was_set && !now_set {
                    if let Some(held) = self.held.take() {
                        self.offset = held.to_unix() - (self.clock)();
                    }
                }
                self.ram[usize::from(REG_B)] = value;
            }
            REG_C | REG_D => {}
            other => self.ram[usize::from(other)] = value,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => self.read_register(self.index),
            // The index register cannot be read back on PCs.
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            INDEX_OFFSET => self.index = value & !INDEX_NMI_MASK,
            DATA_OFFSET => self.write_register(self.index, value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-02 15:04:05 UTC, a Wednesday.
    const WEDNESDAY: i64 = 1_796_223_845;

    fn fixed() -> i64 {
        WEDNESDAY
    }

    fn reg(dev: &mut Cmos, index: u8) -> u8 {
        dev.write(INDEX_OFFSET, &[index]);
        let mut b = [0u8];
        dev.read(DATA_OFFSET, &mut b);
        b[0]
    }

    fn set(dev: &mut Cmos, index: u8, value: u8) {
        dev.write(INDEX_OFFSET, &[index]);
        dev.write(DATA_OFFSET, &[value]);
    }

    #[test]
    fn calendar_conversion_round_trips() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        for seconds in [0, 951_782_400, WEDNESDAY, 4_102_444_800, -86_400] {
            assert_eq!(DateTime::from_unix(seconds).to_unix(), seconds);
        }
        assert_eq!(DateTime::from_unix(0).weekday(), 5, "1970-01-01: Thursday");
    }

    #[test]
    fn power_on_reads_bcd_24_hour_time_and_status() {
        let mut dev = Cmos::with_clock(fixed);
        assert_eq!(reg(&mut dev, REG_SECONDS), 0x05);
        assert_eq!(reg(&mut dev, REG_MINUTES), 0x04);
        assert_eq!(reg(&mut dev, REG_HOURS), 0x15);
        assert_eq!(reg(&mut dev, REG_WEEKDAY), 4, "Wednesday");
        assert_eq!(reg(&mut dev, REG_DAY), 0x02);
        assert_eq!(reg(&mut dev, REG_MONTH), 0x12);
        assert_eq!(reg(&mut dev, REG_YEAR), 0x26);
        assert_eq!(reg(&mut dev, REG_CENTURY), 0x20);
        assert_eq!(reg(&mut dev, REG_A), A_DEFAULT);
        assert_eq!(reg(&mut dev, REG_B), B_24H);
        assert_eq!(reg(&mut dev, REG_C), 0);
        assert_eq!(reg(&mut dev, REG_D), D_VALID);
    }

    #[test]
    fn update_in_progress_never_reads_set() {
        let mut dev = Cmos::with_clock(fixed);
        set(&mut dev, REG_A, 0xff);
        assert_eq!(reg(&mut dev, REG_A), 0x7f);
        // With NMIs masked through the index port as Linux's CMOS_READ does.
        dev.write(INDEX_OFFSET, &[REG_A | INDEX_NMI_MASK]);
        let mut b = [0u8];
        dev.read(DATA_OFFSET, &mut b);
        assert_eq!(b[0] & A_UIP, 0);
    }

    #[test]
    fn binary_and_12_hour_modes_follow_register_b() {
        let mut dev = Cmos::with_clock(fixed);
        set(&mut dev, REG_B, B_BINARY | B_24H);
        assert_eq!(reg(&mut dev, REG_HOURS), 15);
        assert_eq!(reg(&mut dev, REG_YEAR), 26);
        assert_eq!(reg(&mut dev, REG_MONTH), 12);
        set(&mut dev, REG_B, B_BINARY);
        assert_eq!(reg(&mut dev, REG_HOURS), HOUR_PM | 3, "3 PM, binary");
        set(&mut dev, REG_B, 0);
        assert_eq!(reg(&mut dev, REG_HOURS), HOUR_PM | 0x03, "3 PM, BCD");
        // Midnight and noon in 12-hour form.
        assert_eq!(dev.encode_hour(0), 0x12, "12 AM");
        assert_eq!(dev.encode_hour(12), HOUR_PM | 0x12, "12 PM");
        assert_eq!(dev.decode_hour(0x12), 0);
        assert_eq!(dev.decode_hour(HOUR_PM | 0x12), 12);
        assert_eq!(dev.decode_hour(HOUR_PM | 0x11), 23);
    }

    #[test]
    fn guest_sets_the_clock_with_set_bit() {
        let mut dev = Cmos::with_clock(fixed);
        set(&mut dev, REG_B, B_SET | B_24H);
        set(&mut dev, REG_YEAR, 0x30);
        set(&mut dev, REG_MONTH, 0x01);
        set(&mut dev, REG_DAY, 0x31);
        set(&mut dev, REG_HOURS, 0x23);
        set(&mut dev, REG_MINUTES, 0x59);
        set(&mut dev, REG_SECONDS, 0x58);
        // Held while SET is on.
        assert_eq!(reg(&mut dev, REG_SECONDS), 0x58);
        set(&mut dev, REG_B, B_24H);
        assert_eq!(dev.held, None);
        let expected = days_from_civil(2030, 1, 31) * 86_400 + 23 * 3600 + 59 * 60 + 58;
        assert_eq!(dev.offset, expected - WEDNESDAY);
        assert_eq!(reg(&mut dev, REG_YEAR), 0x30);
        assert_eq!(reg(&mut dev, REG_WEEKDAY), 5, "2030-01-31 is a Thursday");
    }

    #[test]
    fn a_field_written_without_set_applies_at_once() {
        let mut dev = Cmos::with_clock(fixed);
        set(&mut dev, REG_B, B_BINARY);
        set(&mut dev, REG_HOURS, HOUR_PM | 1);
        assert_eq!(reg(&mut dev, REG_HOURS), HOUR_PM | 1);
        assert_eq!(dev.offset, -2 * 3600);
        assert_eq!(reg(&mut dev, REG_MINUTES), 4, "other fields unchanged");
    }

    #[test]
    fn ram_keeps_what_the_guest_writes_and_status_is_read_only() {
        let mut dev = Cmos::with_clock(fixed);
        set(&mut dev, 0x40, 0xab);
        set(&mut dev, 0x7f, 0xcd);
        assert_eq!((reg(&mut dev, 0x40), reg(&mut dev, 0x7f)), (0xab, 0xcd));
        set(&mut dev, REG_C, 0xff);
        set(&mut dev, REG_D, 0x00);
        assert_eq!((reg(&mut dev, REG_C), reg(&mut dev, REG_D)), (0, D_VALID));
        // The index port itself reads as nothing; NMI mask bit is not part of the index.
        let mut b = [0u8];
        dev.read(INDEX_OFFSET, &mut b);
        assert_eq!(b[0], 0xff);
        dev.write(INDEX_OFFSET, &[0x80 | 0x40]);
        dev.read(DATA_OFFSET, &mut b);
        assert_eq!(b[0], 0xab);
    }

    #[test]
    fn host_clock_is_shown_by_default() {
        let dev = Cmos::new();
        let shown = dev.now().to_unix();
        assert!((shown - host_now()).abs() <= 1);
    }
}

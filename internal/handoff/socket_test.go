package handoff

import (
	"errors"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func dups(t testing.TB, n int) []int {
	t.Helper()
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fds := make([]int, n)
	for i := range fds {
		if fds[i], err = unix.Dup(int(f.Fd())); err != nil {
			t.Fatal(err)
		}
	}
	return fds
}

func isOpen(fd int) bool {
	_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	return err == nil
}

// CloseFDs closes every fd it is given, runs and lone ones, in any order,
// and no fd between them that it was not given.
func TestCloseFDsClosesEveryOneAndNoOther(t *testing.T) {
	src := dups(t, 1)[0]
	defer unix.Close(src)
	// Twelve consecutive numbers, placed with dup3(2) in free slots well
	// above what the test binary holds, below its limit.
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	base := int(min(lim.Cur, 1024)) - 16
	fds := make([]int, 12)
	for i := range fds {
		if isOpen(base + i) {
			t.Fatalf("fd %d is already open", base+i)
		}
		if err := unix.Dup3(src, base+i, unix.O_CLOEXEC); err != nil {
			t.Fatalf("dup3 to fd %d (RLIMIT_NOFILE %d): %v", base+i, lim.Cur, err)
		}
		fds[i] = base + i
	}
	given := []int{fds[0], fds[1], fds[2], fds[4], fds[5], fds[11], fds[7], fds[9], fds[8]}
	kept := []int{fds[3], fds[6], fds[10]}
	CloseFDs(given)
	for _, fd := range given {
		if isOpen(fd) {
			t.Errorf("fd %d given to CloseFDs is still open", fd)
		}
	}
	for _, fd := range kept {
		if !isOpen(fd) {
			t.Errorf("fd %d, not given, was closed", fd)
		}
		unix.Close(fd)
	}
}

// BenchmarkCloseFDs closes a batch of MaxFDs consecutive fds, as Recv
// puts them, with CloseFDs and with a close(2) each, and reports ns per fd.
//
//	go test -run '^$' -bench CloseFDs ./internal/handoff
func BenchmarkCloseFDs(b *testing.B) {
	for _, each := range []bool{false, true} {
		name := "CloseFDs"
		if each {
			name = "close-each"
		}
		b.Run(name, func(b *testing.B) {
			b.StopTimer() // only the closes are timed
			for i := 0; i < b.N; i++ {
				fds := dups(b, MaxFDs)
				b.StartTimer()
				if each {
					for _, fd := range fds {
						unix.Close(fd)
					}
				} else {
					CloseFDs(fds)
				}
				b.StopTimer()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*MaxFDs), "ns/fd")
		})
	}
}

// A Socket that stamps arrivals says when each message was queued at it,
// with every fd a full batch carries still received: the timestamp's
// control data fits beside 253 fds.
func TestStampArrivals(t *testing.T) {
	sa, sb := socketPair(t)
	if err := sb.StampArrivals(); err != nil {
		t.Fatal(err)
	}
	fds := dups(t, MaxFDs)
	defer CloseFDs(fds)
	m := Message{Type: TypeHandoff, ID: 1, Kind: "raw", Conns: make([]Conn, MaxFDs)}
	before := time.Now()
	if err := sa.Send(m, fds); err != nil {
		t.Fatal(err)
	}
	sent := time.Now()
	// The message must age in the queue for the stamp to show when it came
	// rather than when it was read: the wait is what is measured.
	const aged = 50 * time.Millisecond
	time.Sleep(aged)
	got, in, err := sb.Recv()
	defer CloseFDs(in)
	if err != nil {
		t.Fatal(err)
	}
	if len(in) != MaxFDs {
		t.Fatalf("received %d fds, want %d", len(in), MaxFDs)
	}
	// Wall clock on both sides (SO_TIMESTAMPNS is CLOCK_REALTIME); a
	// microsecond of slack for the kernel's coarser reading.
	if got.Arrived.Before(before.Round(0).Add(-time.Microsecond)) || got.Arrived.After(sent.Round(0)) {
		t.Fatalf("Arrived %v, want between the send's start (%v) and its return (%v), not at the receive", got.Arrived, before, sent)
	}
	// Without the option, nothing is stamped.
	if err := sb.Send(Message{Type: TypeAck, ID: 1}, nil); err != nil {
		t.Fatal(err)
	}
	if ack, _, err := sa.Recv(); err != nil || !ack.Arrived.IsZero() {
		t.Fatalf("unstamped socket: %+v, %v; want a zero Arrived", ack, err)
	}
}

// Queued tells a message waiting from none, and a read deadline that has
// passed fails Recv without taking the message, which a Recv with the
// deadline cleared then gets.
func TestQueuedAndReadDeadline(t *testing.T) {
	sa, sb := socketPair(t)
	if q, err := sb.Queued(); err != nil || q {
		t.Fatalf("Queued on an empty socket: %v, %v; want false", q, err)
	}
	if err := sa.Send(Message{Type: TypeAck, ID: 7}, nil); err != nil {
		t.Fatal(err)
	}
	if q, err := sb.Queued(); err != nil || !q {
		t.Fatalf("Queued with a message waiting: %v, %v; want true", q, err)
	}
	sb.SetReadDeadline(time.Unix(1, 0))
	if _, _, err := sb.Recv(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Recv past its deadline: %v, want os.ErrDeadlineExceeded", err)
	}
	if q, _ := sb.Queued(); !q {
		t.Fatal("the message went with the failed Recv")
	}
	sb.SetReadDeadline(time.Time{})
	if m, _, err := sb.Recv(); err != nil || m.Type != TypeAck || m.ID != 7 {
		t.Fatalf("Recv: %+v, %v; want ACK id=7", m, err)
	}
	if q, err := sb.Queued(); err != nil || q {
		t.Fatalf("Queued once read: %v, %v; want false", q, err)
	}
	// A hang-up counts: a Recv returns it at once, past a deadline or not.
	sa.Close()
	if q, err := sb.Queued(); err != nil || !q {
		t.Fatalf("Queued once the peer closed: %v, %v; want true", q, err)
	}
	if _, _, err := sb.Recv(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Recv once the peer closed: %v, want ErrClosed", err)
	}
}

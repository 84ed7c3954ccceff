package handoff

import (
	"bytes"
	"errors"
	"net"
	"os"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/testnet"
)

func TestRoundTrip(t *testing.T) {
	for _, m := range []Message{
		{Type: TypeAccept, Kinds: []string{"http", "counter.v1"}},
		{Type: TypeAccept},
		{Type: TypeAck, ID: 42},
		{Type: TypeNak, ID: 7, Reason: "no ready worker takes kind http"},
		{Type: TypeHandoff, ID: 9, Kind: "http", Conns: []Conn{{State: []byte{}, Buffered: []byte{}}, {State: []byte("n=5\n"), Buffered: []byte("GET")}}},
	} {
		b, err := Encode(m)
		if err != nil {
			t.Fatal(err)
		}
		got, err := Parse(b, len(m.Conns))
		if err != nil {
			t.Fatalf("Parse(%q): %v", b, err)
		}
		if !reflect.DeepEqual(got, m) {
			t.Fatalf("round trip of %q: got %+v, want %+v", b, got, m)
		}
	}
}

func TestParseRejectsAndNames(t *testing.T) {
	for in, want := range map[string]string{
		"HELLO\n":                        `does not start with "UPGRADER/1 "`,
		"UPGRADER/1 ACK id=1":            "no newline",
		"UPGRADER/1 ACK id=x\n":          `id "x"`,
		"UPGRADER/1 ACK\n":               "lacks id=",
		"UPGRADER/1 ACK id=1 id=2\n":     "repeated",
		"UPGRADER/1 NAK id=1\n":          "no reason=",
		"UPGRADER/1 ACCEPT kinds=HTTP\n": `kind "HTTP"`,
		"UPGRADER/1 BOOM id=1\n":         "unknown message type",
		"UPGRADER/1 HANDOFF id=1 kind=http n=2\nstate=0 buffered=0\nstate=0 buffered=0\n\n": "n=2 but 1 fds",
		"UPGRADER/1 HANDOFF id=1 kind=http n=1\nstate=9 buffered=0\n\nabc":                  "payload is 6 bytes short",
		"UPGRADER/1 HANDOFF id=1 kind=http n=1\nstate=-1 buffered=0\n\n":                    "over the limits",
		"UPGRADER/1 HANDOFF id=1 kind=http n=1\nstate=1 buffered=0\n\nab":                   "1 bytes after the payload",
		"UPGRADER/1 HANDOFF id=1 kind=http n=1\nstate=01 buffered=0\n\nx":                   "not state=N buffered=N",
		"UPGRADER/1 HANDOFF id=1 kind=http n=1\nstate=+1 buffered=0\n\nx":                   "not state=N buffered=N",
		"UPGRADER/1 HANDOFF id=1 kind=http n=1\nstate=-0 buffered=0\n\n":                    "not state=N buffered=N",
		"UPGRADER/1 HANDOFF id=1 kind=http n=1\nstate=1  buffered=0\n\nx":                   "not state=N buffered=N",
		"UPGRADER/1 HANDOFF id=1 kind=http n=1\nstate=1 buffered=0x\n\nx":                   "not state=N buffered=N",
		"UPGRADER/1 HANDOFF id=1 kind=http n=1\nstate=99999999999 buffered=0\n\n":           "over the limits",
		"UPGRADER/1 HANDOFF id=1 kind=http n=0\n\n":                                         `n="0"`,
	} {
		nfds := 0
		if strings.Contains(in, "HANDOFF") {
			nfds = 1
		}
		_, err := Parse([]byte(in), nfds)
		if err == nil || !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%.50q) = %v, want ErrMalformed naming %q", in, err, want)
		}
	}
	if _, err := Parse([]byte("UPGRADER/1 ACK id=1\n"), 2); err == nil {
		t.Error("an ACK with fds was accepted")
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"UPGRADER/1 ACK id=1\n", "UPGRADER/1 NAK id=3 reason=x y\n", "UPGRADER/1 ACCEPT kinds=http,ws\n",
		"UPGRADER/1 HANDOFF id=1 kind=http n=1\nstate=2 buffered=1\n\nabc"} {
		f.Add([]byte(s), 1)
	}
	f.Fuzz(func(t *testing.T, b []byte, nfds int) {
		m, err := Parse(b, nfds)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		if m.Type == TypeHandoff && len(m.Conns) != nfds {
			t.Fatalf("%d conns for %d fds", len(m.Conns), nfds)
		}
		// What parses re-encodes to something that parses the same.
		out, err := Encode(m)
		if err != nil {
			t.Fatalf("re-encode of %+v: %v", m, err)
		}
		m2, err := Parse(out, nfds)
		if err != nil || !reflect.DeepEqual(m, m2) {
			t.Fatalf("re-parse of %q: %+v, %v", out, m2, err)
		}
	})
}

// socketPair is the two ends of a new channel as Sockets, closed at the
// test's end.
func socketPair(t *testing.T) (sa, sb *Socket) {
	t.Helper()
	a, b, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	sa, err = NewSocket(a)
	if err != nil {
		b.Close()
		t.Fatal(err)
	}
	sb, err = NewSocket(b)
	if err != nil {
		sa.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { sa.Close(); sb.Close() })
	return sa, sb
}

func TestSocketCarriesFDs(t *testing.T) {
	sa, sb := socketPair(t)
	server, client := testnet.TCPPair(t)
	sf, _ := server.File()
	if err := sa.Send(Message{Type: TypeHandoff, ID: 1, Kind: "raw", Conns: []Conn{{State: []byte("s")}}}, []int{int(sf.Fd())}); err != nil {
		t.Fatal(err)
	}
	sf.Close()
	server.Close() // the sender's copies are gone; the connection lives on in the message
	m, files, err := sb.Recv()
	if err != nil || len(files) != 1 || string(m.Conns[0].State) != "s" {
		t.Fatalf("Recv: %+v %v %v", m, files, err)
	}
	f := os.NewFile(uintptr(files[0]), "conn")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	client.Write([]byte("ping"))
	buf := make([]byte, 4)
	if _, err := c.Read(buf); err != nil || !bytes.Equal(buf, []byte("ping")) {
		t.Fatalf("read on the handed-off connection: %q %v", buf, err)
	}
	// A malformed message is reported, and the channel goes on.
	sa.c.Write([]byte("garbage"))
	if _, _, err := sb.Recv(); !errors.Is(err, ErrMalformed) {
		t.Fatalf("garbage: %v", err)
	}
	sa.Send(Message{Type: TypeAck, ID: 3}, nil)
	if m, _, err := sb.Recv(); err != nil || m.ID != 3 {
		t.Fatalf("after garbage: %+v %v", m, err)
	}
	sa.Close()
	if _, _, err := sb.Recv(); !errors.Is(err, ErrClosed) {
		t.Fatalf("after close: %v", err)
	}
}

// fdTableSize is this process's fd table size (FDSize in /proc/self/status).
func fdTableSize(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "FDSize:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no FDSize in /proc/self/status")
	return 0
}

// ReserveFDs grows the fd table (so that a recvmsg of many fds does not)
// and leaves no fd open.
func TestReserveFDsGrowsTheTable(t *testing.T) {
	a, b, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	s, err := NewSocket(a)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// Twice the table, within RLIMIT_NOFILE: a run before this one (-count)
	// may have grown it to the limit already.
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	want := int(min(uint64(2*fdTableSize(t)), rl.Cur))
	ents, _ := os.ReadDir("/proc/self/fd")
	if err := s.ReserveFDs(want); err != nil {
		t.Fatal(err)
	}
	if got := fdTableSize(t); got < want {
		t.Fatalf("fd table %d after ReserveFDs(%d)", got, want)
	}
	if after, _ := os.ReadDir("/proc/self/fd"); len(after) != len(ents) {
		t.Fatalf("%d fds open after ReserveFDs, %d before", len(after), len(ents))
	}
	// Beyond RLIMIT_NOFILE it reserves up to the limit, without error.
	if err := s.ReserveFDs(1 << 30); err != nil {
		t.Fatal(err)
	}
}

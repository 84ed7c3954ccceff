package sdnotify

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

func TestParse(t *testing.T) {
	m, err := Parse([]byte("READY=1\nSTATUS=serving 3 clients\n\nX_CUSTOM=a=b\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !m.Is("READY", "1") {
		t.Error("READY=1 not seen")
	}
	if v, _ := m.Get("STATUS"); v != "serving 3 clients" {
		t.Errorf("STATUS=%q", v)
	}
	if v, _ := m.Get("X_CUSTOM"); v != "a=b" {
		t.Errorf("X_CUSTOM=%q", v)
	}
}

func TestParseRejectsAndNames(t *testing.T) {
	for in, want := range map[string]string{
		"":                            "empty",
		"\n\n":                        "empty",
		"READY":                       `"READY" is not KEY=VALUE`,
		"=1":                          "empty key",
		"1READY=1":                    "invalid character",
		"READY=yes":                   "READY must be 1",
		"WATCHDOG=2":                  "WATCHDOG must be 1 or trigger",
		"ERRNO=-1":                    "ERRNO must be a non-negative integer",
		"EXTEND_TIMEOUT_USEC=5s":      "EXTEND_TIMEOUT_USEC",
		"READY=1\x00":                 "NUL",
		strings.Repeat("A", 5000):     "larger than",
		"STATUS=ok\nMAINPID=twelve\n": "MAINPID",
	} {
		_, err := Parse([]byte(in))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%.20q) = %v, want an error containing %q", in, err, want)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"READY=1", "STATUS=x\nREADY=1\n", "WATCHDOG=trigger", "FDSTORE=1\nFDNAME=db", "=", "\n", "A=\xff"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Parse(b)
		if err != nil {
			if m != nil {
				t.Fatal("message returned with an error")
			}
			if !utf8.ValidString(err.Error()) && utf8.Valid(b) {
				t.Fatalf("error text is not valid UTF-8: %q", err)
			}
			return
		}
		if len(m) == 0 {
			t.Fatal("no error and no field")
		}
		for _, f := range m {
			if f.Key == "" || strings.ContainsAny(f.Key, "=\n") || strings.Contains(f.Value, "\n") {
				t.Fatalf("bad field %+v", f)
			}
		}
	})
}

// TestServerSeesSenderCredentials sends with go-systemd's client, as a
// worker would, and checks the kernel-vouched pid.
func TestServerSeesSenderCredentials(t *testing.T) {
	path := filepath.Join(t.TempDir(), "notify.sock")
	s, err := Listen(path, 4)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	t.Setenv("NOTIFY_SOCKET", path)
	if ok, err := daemon.SdNotify(false, "READY=1\nSTATUS=up"); !ok || err != nil {
		t.Fatalf("SdNotify: %v %v", ok, err)
	}
	d, err := s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if d.Pid != os.Getpid() || d.Err != nil || !d.Message.Is("READY", "1") {
		t.Fatalf("got %+v, want READY=1 from pid %d", d, os.Getpid())
	}

	// A malformed datagram comes back as a Datagram with Err, not as a
	// socket error, so the caller can name the sender.
	c, err := net.Dial("unixgram", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("garbage"))
	d, err = s.Recv()
	if err != nil || d.Err == nil || d.Pid != os.Getpid() {
		t.Fatalf("malformed datagram: %+v, %v", d, err)
	}

	// Close wakes a blocked Recv.
	done := make(chan error)
	go func() { _, err := s.Recv(); done <- err }()
	s.Close()
	if err := <-done; err == nil {
		t.Fatal("Recv after Close returned no error")
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket file left behind: %v", err)
	}
}

// TestServerTakesAtMostMaxFDs sends more fds than the server takes: only
// maxFDs reach this process, the kernel closes the rest, the datagram says
// so, and its payload still counts.
func TestServerTakesAtMostMaxFDs(t *testing.T) {
	path := filepath.Join(t.TempDir(), "notify.sock")
	s, err := Listen(path, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fds := make([]int, 10)
	for i := range fds {
		fds[i] = int(os.Stdin.Fd())
	}
	if _, _, err := c.WriteMsgUnix([]byte("FDSTORE=1"), unix.UnixRights(fds...), &net.UnixAddr{Name: path, Net: "unixgram"}); err != nil {
		t.Fatal(err)
	}
	d, err := s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, f := range d.Files {
			f.Close()
		}
	}()
	if len(d.Files) > 2 || !d.FDsTruncated || d.Err != nil || !d.Message.Is("FDSTORE", "1") {
		t.Fatalf("got %d fds, truncated %v, message %v, error %v; want at most 2, truncated, and the message parsed",
			len(d.Files), d.FDsTruncated, d.Message, d.Err)
	}
}

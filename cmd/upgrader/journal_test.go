package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestOnJournalMatchesDeviceAndInode(t *testing.T) {
	f, st := statFile(t, "stream")
	match := fmt.Sprintf("%d:%d", uint64(st.Dev), st.Ino)
	for _, c := range []struct {
		env  string
		want bool
	}{
		{match, true},
		{"", false},
		{fmt.Sprintf("%d:%d", uint64(st.Dev), st.Ino+1), false},
		{fmt.Sprintf("%d:%d", uint64(st.Dev)+1, st.Ino), false},
		{"garbage", false},
		{":", false},
	} {
		if got := onJournal(c.env, int(f.Fd())); got != c.want {
			t.Errorf("onJournal(%q) = %v, want %v", c.env, got, c.want)
		}
	}
}

// logLines logs one line per level through a logger built as run builds it
// and returns what was written.
func logLines(t *testing.T, format string, journal bool) []string {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "log"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	log, err := newLoggerTo(format, "debug", f, journal)
	if err != nil {
		t.Fatal(err)
	}
	log.Debug("d")
	log.Info("i")
	log.Warn("w")
	log.Error("e")
	log.Sync()
	b, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

func TestJournalPriorityPrefixes(t *testing.T) {
	for _, format := range []string{"json", "console"} {
		lines := logLines(t, format, true)
		if len(lines) != 4 {
			t.Fatalf("%s: %d lines, want 4:\n%s", format, len(lines), strings.Join(lines, "\n"))
		}
		for i, prefix := range []string{"<7>", "<6>", "<4>", "<3>"} {
			if !strings.HasPrefix(lines[i], prefix) {
				t.Errorf("%s: line %d %q does not start with %s", format, i, lines[i], prefix)
			}
		}
		plain := logLines(t, format, false)
		for i, l := range plain {
			if strings.HasPrefix(l, "<") {
				t.Errorf("%s without the journal: line %d %q has a priority prefix", format, i, l)
			}
		}
		if format == "json" && (!strings.HasPrefix(plain[3], `{"level":"error"`) || !strings.HasPrefix(lines[3], `<3>{"level":"error"`)) {
			t.Errorf("json: %q without the journal, %q with it", plain[3], lines[3])
		}
	}
}

// TestJournalStreamSelectsPrefixes runs the check run makes: with
// JOURNAL_STREAM naming the file stderr points at, lines get prefixes.
func TestJournalStreamSelectsPrefixes(t *testing.T) {
	f, st := statFile(t, "stderr")
	saved, err := unix.Dup(2)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { unix.Dup2(saved, 2); unix.Close(saved) }()
	if err := unix.Dup2(int(f.Fd()), 2); err != nil {
		t.Fatal(err)
	}
	t.Setenv("JOURNAL_STREAM", fmt.Sprintf("%d:%d", uint64(st.Dev), st.Ino))
	if !stderrOnJournal() {
		t.Fatal("stderr pointed at the JOURNAL_STREAM file is not seen as the journal")
	}
	log, err := newLogger("json", "info")
	if err != nil {
		t.Fatal(err)
	}
	log.Error("boom")
	log.Info("fine")
	log.Sync()
	t.Setenv("JOURNAL_STREAM", "")
	if stderrOnJournal() {
		t.Fatal("no JOURNAL_STREAM, yet stderr is seen as the journal")
	}
	b, _ := os.ReadFile(f.Name())
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], `<3>{"level":"error"`) || !strings.HasPrefix(lines[1], `<6>{"level":"info"`) {
		t.Fatalf("lines on the journal stream:\n%s", b)
	}
}

// statFile creates a file named name in a temporary directory (closed at
// the test's end) and returns it with its stat, whose device and inode are
// what JOURNAL_STREAM names.
func statFile(t *testing.T, name string) (*os.File, unix.Stat_t) {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), name))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return f, st
}

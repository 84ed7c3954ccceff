package main

import (
	"fmt"
	"os"
	"strings"

	"go.uber.org/zap/buffer"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sys/unix"
)

// onJournal reports whether fd is connected to the journal: systemd sets
// JOURNAL_STREAM to "DEVICE:INODE" (decimal) of the stream it connects
// stdout and stderr to (systemd.exec(5)); a match with fd's fstat means the
// journal reads what is written there. A redirected stderr (2>file) keeps
// the variable but no longer matches.
func onJournal(journalStream string, fd int) bool {
	dev, ino, ok := strings.Cut(journalStream, ":")
	if !ok || dev == "" || ino == "" {
		return false
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return false
	}
	return dev == fmt.Sprint(uint64(st.Dev)) && ino == fmt.Sprint(st.Ino)
}

// syslogPrefix is the "<N>" that journald parses at the start of a line on
// a stream connection to file the line at priority N (sd-daemon(3)).
func syslogPrefix(l zapcore.Level) string {
	switch {
	case l >= zapcore.ErrorLevel: // error, dpanic, panic, fatal
		return "<3>" // SD_ERR
	case l == zapcore.WarnLevel:
		return "<4>" // SD_WARNING
	case l == zapcore.InfoLevel:
		return "<6>" // SD_INFO
	default:
		return "<7>" // SD_DEBUG
	}
}

// journalEncoder puts the entry's syslog priority prefix in front of each
// encoded entry, so that journald files it at the entry's level rather than
// at the stream's default (info). Entries are one line each (no stack
// traces), so one prefix per entry is one per line.
type journalEncoder struct{ zapcore.Encoder }

var journalPool = buffer.NewPool()

func (e journalEncoder) Clone() zapcore.Encoder { return journalEncoder{e.Encoder.Clone()} }

func (e journalEncoder) EncodeEntry(ent zapcore.Entry, fields []zapcore.Field) (*buffer.Buffer, error) {
	b, err := e.Encoder.EncodeEntry(ent, fields)
	if err != nil {
		return nil, err
	}
	out := journalPool.Get()
	out.AppendString(syslogPrefix(ent.Level))
	out.Write(b.Bytes())
	b.Free()
	return out, nil
}

// stderrOnJournal is whether upgrader's stderr is the journal's stream.
func stderrOnJournal() bool { return onJournal(os.Getenv("JOURNAL_STREAM"), 2) }

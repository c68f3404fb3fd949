package agent

import (
	"os"
	"testing"
)

func TestProcUsageOfSelf(t *testing.T) {
	rss, cpu := procUsage(os.Getpid())
	if rss < 1<<20 || rss > 1<<34 || cpu < 0 {
		t.Fatalf("procUsage(self) = rss %v, cpu %v", rss, cpu)
	}
	if rss, cpu := procUsage(-1); rss != 0 || cpu != 0 {
		t.Fatalf("procUsage(-1) = %v, %v", rss, cpu)
	}
}

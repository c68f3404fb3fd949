package state

import (
	"encoding/json"
	"fmt"
	"strings"

	"github.com/redis-agent/redis-agent/apitype"
)

// decode reads the record stored under k, bringing what older agents wrote
// in line with what this one writes.
func decode(k, v []byte) (Instance, error) {
	var inst Instance
	if err := json.Unmarshal(v, &inst); err != nil {
		return Instance{}, fmt.Errorf("instance %q: decode: %w", k, err)
	}
	upgradeExit(inst.LastExit)
	return inst, nil
}

// legacySpawnFailed starts the reason of a failed spawn in records written
// before exits had a message: "spawn failed: <the error>".
const legacySpawnFailed = "spawn failed: "

// upgradeExit turns a legacy spawn failure's free-text reason into the
// reason spawn_failed and the error as the message. The record is written
// that way at its next update; no migration is needed, and an older agent
// reads the new form as just another reason.
func upgradeExit(e *apitype.Exit) {
	if e == nil {
		return
	}
	if msg, ok := strings.CutPrefix(e.Reason, legacySpawnFailed); ok && e.Message == "" {
		e.Reason, e.Message = apitype.ReasonSpawnFailed, msg
	}
}

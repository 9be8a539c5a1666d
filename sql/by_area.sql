-- The seed's "aggregate by area": every year summed over AREA, per remaining group.
-- Run with: hedf sql --key KEYDIR [--server URL --user U] --format pivot -f sql/by_area.sql
SELECT "AGE GROUP", "SEX",
       he_sum("2018") AS "2018",
       he_sum("2019") AS "2019",
       he_sum("2020") AS "2020",
       he_sum("2021") AS "2021",
       he_sum("2022") AS "2022"
FROM population
GROUP BY "AGE GROUP", "SEX"
ORDER BY "AGE GROUP", "SEX";
